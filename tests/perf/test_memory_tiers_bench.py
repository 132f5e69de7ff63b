"""bench/memory_tiers.py imports and runs on the CPU (tiny widths, no memory cap): the plumbing the GPU run uses."""

from __future__ import annotations

from helpers.bench import load_bench


def _bench():
    return load_bench("memory_tiers")


def test_cpu_smoke_run_applies_the_tier(tmp_path):
    bench = _bench()
    results = bench.main(["--device", "cpu", "--tiny", "--tiers", "12gb", "--res", "32", "--lora", "tier", "fluxgym",
                          "--steps", "1", "--warm", "1", "--in-process", "--bfl-dir", str(tmp_path)])
    assert [r["lora"] for r in results] == ["tier", "fluxgym"]
    tier, fluxgym = results
    assert "error" not in tier and tier["s_per_step"] > 0 and tier["first_step_s"] > 0
    assert tier["storage"] == "fp8" and tier["checkpointing"] and tier["optim"] == "adafactor"
    assert tier["lora_blocks"] == "single" and fluxgym["lora_rank"] == 4
    assert tier["swap_active"] is False  # the CPU has nothing to swap to
    assert list(tmp_path.glob("*.safetensors"))  # the random BFL file the cells read


def test_verdict_and_table():
    bench = _bench()
    r = bench.verdict({"tier": "12gb", "res": 512, "lora": "tier", "budget_gib": 12, "peak_reserved_gib": 10.5,
                       "s_per_step": 0.3895, "lora_rank": 4, "lora_blocks": "single"})
    assert r["fits"] and r["speedup_vs_sd_scripts"] == 2.0  # FluxGym's LoRA settings: compared with sd-scripts
    assert "speedup_vs_sd_scripts" not in bench.verdict({"tier": "12gb", "res": 512, "lora": "r16all", "budget_gib": 12,
                                                         "s_per_step": 0.3, "lora_rank": 16, "lora_blocks": "all"})
    assert not bench.verdict({"tier": "8gb", "res": 512, "lora": "tier", "budget_gib": 8,
                              "peak_reserved_gib": 7.2})["fits"]
    assert "| 12gb | 512 | tier |" in bench.table([r])
