"""`memory.base_storage` / `memory.fp8_matmul: auto`: fp8 storage multiplied in fp8 only where that was measured to
pay (a Hopper GPU without a memory budget, FLUX.1, 1024 px or more); the bf16 base everywhere else."""

import pytest
import torch

from fluxlora.errors import FluxLoraError
from fluxlora.perf.memory import MemorySettings, apply_memory_settings
from fluxlora.run.settings import check_config, for_device

CUDA = torch.device("cuda", 0)


@pytest.fixture
def gpu(monkeypatch):
    """A CUDA device of the given compute capability, as `resolved` reads it (no GPU is touched)."""
    def make(capability):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: f"sm{capability[0]}{capability[1]}")
        return CUDA
    return make


def _concrete(m: MemorySettings) -> tuple:
    return m.base_storage, m.fp8_matmul


def test_auto_is_fp8_matmuls_on_hopper_at_1024_px_without_a_budget(gpu, caplog):
    auto = MemorySettings(base_storage="auto", fp8_matmul="auto")
    with caplog.at_level("INFO", logger="fluxlora.perf.memory"):
        assert _concrete(auto.resolved(gpu((9, 0)), 1024)) == ("fp8", True)
    assert "base weights in fp8, multiplied in fp8 (auto: sm90" in caplog.text
    assert _concrete(auto.resolved(gpu((10, 0)), 1536)) == ("fp8", True)


@pytest.mark.parametrize("why", ["cpu", "ada", "512 px", "budget", "chroma", "ddp"])
def test_auto_is_the_bf16_base_where_fp8_was_not_measured_to_pay(gpu, why):
    m = MemorySettings(base_storage="auto", fp8_matmul="auto", budget_gb=24 if why == "budget" else None)
    device = torch.device("cpu") if why == "cpu" else gpu((8, 9) if why == "ada" else (9, 0))
    got = m.resolved(device, 512 if why == "512 px" else 1024, flux1=why != "chroma",
                     processes=2 if why == "ddp" else 1)
    assert _concrete(got) == ("none", False)


def test_explicit_values_are_kept_and_auto_matmul_follows_them(gpu):
    assert _concrete(MemorySettings(base_storage="fp8", fp8_matmul="auto").resolved(gpu((9, 0)), 1024)) == ("fp8", True)
    # a tier: fp8 storage and a budget, so no fp8 matmuls (not measured with block swapping)
    tier = MemorySettings(base_storage="fp8", fp8_matmul="auto", budget_gb=16)
    assert _concrete(tier.resolved(gpu((9, 0)), 1024)) == ("fp8", False)
    # fp8 storage alone is slower than bf16: auto storage with matmuls turned off stays bf16
    assert _concrete(MemorySettings(base_storage="auto", fp8_matmul=False).resolved(gpu((9, 0)), 1024)) == (
        "none", False)
    assert _concrete(MemorySettings(base_storage="nf4", fp8_matmul="auto").resolved(gpu((9, 0)), 1024)) == (
        "nf4", False)
    with pytest.raises(ValueError, match="memory.fp8_matmul=true needs fp8 storage; memory.base_storage=auto chose"):
        MemorySettings(base_storage="auto", fp8_matmul=True).resolved(torch.device("cpu"), 1024)
    with pytest.raises(ValueError, match="fp8_matmul='yes' is not one of"):
        MemorySettings(fp8_matmul="yes")


def test_unresolved_auto_is_refused_where_settings_are_applied():
    with pytest.raises(ValueError, match="make them concrete"):
        apply_memory_settings(torch.nn.Linear(2, 2), MemorySettings(base_storage="auto"), torch.float32)


def test_the_shipped_config_resolves_per_run(make_cfg, gpu, monkeypatch):
    import fluxlora.run.settings as run_settings

    monkeypatch.setattr(run_settings, "requested_processes", lambda cfg, device: (1, 1))  # the fake GPU has no count
    cfg = make_cfg()
    raw = check_config(cfg).memory
    assert _concrete(raw) == ("auto", "auto")
    assert _concrete(for_device(check_config(cfg), cfg, torch.device("cpu")).memory) == ("none", False)
    big = make_cfg("data.resolution=[1280,896]")  # area of ~1070 px squared
    assert _concrete(for_device(check_config(big), big, gpu((9, 0))).memory) == ("fp8", True)
    tiered = make_cfg("+vram=24gb", "data.resolution=1024")
    assert _concrete(for_device(check_config(tiered), tiered, gpu((9, 0))).memory) == ("fp8", False)
    bad = make_cfg("memory.fp8_matmul=true")
    with pytest.raises(FluxLoraError, match="memory.base_storage=auto chose none"):
        for_device(check_config(bad), bad, torch.device("cpu"))


@pytest.mark.parametrize("run, key, reason", [
    (["model=tiny-kontext"], "paired_blocks_to_swap", "control images double"),
    (["lora.type=loha"], "loha_blocks_to_swap", "LoHa trains twice"),
])
def test_a_kontext_or_loha_run_swaps_its_own_count(make_cfg, caplog, run, key, reason):
    """16gb with 4 blocks swapped ran out of memory at 1024 px on the H200 for Kontext (control tokens double the image
    sequence) and for LoHa (twice LoRA's parameters at one rank); with 12 both finished (README "FLUX.1 Kontext",
    "Adapter types"). Other runs keep the tier's count; the key set to null keeps it too."""
    cpu = torch.device("cpu")
    cfg = make_cfg(*run, "+vram=16gb")
    with caplog.at_level("INFO", logger="fluxlora.perf.memory"):
        memory = for_device(check_config(cfg), cfg, cpu).memory
    assert (memory.blocks_to_swap, getattr(memory, key)) == (12, None)
    assert f"12 blocks swapped, not 4 (memory.{key}: {reason}" in caplog.text
    own = make_cfg(*run, "+vram=16gb", f"memory.{key}=null")
    assert for_device(check_config(own), own, cpu).memory.blocks_to_swap == 4
    with pytest.raises(ValueError, match=f"{key} must be >= 0 or null"):
        MemorySettings(**{key: -1})
    with pytest.raises(ValueError, match=f"{key} with memory.base_storage=nf4"):
        MemorySettings(base_storage="nf4", **{key: 4}).resolved(cpu, 512, paired=True, adapter="loha")


def test_the_other_runs_keep_the_tier_count_and_both_counts_take_the_larger(make_cfg):
    cpu = torch.device("cpu")
    for adapter in ("lora", "dora", "lokr"):
        cfg = make_cfg("+vram=16gb", f"lora.type={adapter}")
        assert for_device(check_config(cfg), cfg, cpu).memory.blocks_to_swap == 4, adapter
    both = MemorySettings(blocks_to_swap=2, paired_blocks_to_swap=6, loha_blocks_to_swap=9)
    assert both.resolved(cpu, 512, paired=True, adapter="loha").blocks_to_swap == 9
    assert both.resolved(cpu, 512, paired=True, adapter="lora").blocks_to_swap == 6
    assert both.resolved(cpu, 512, adapter="loha").blocks_to_swap == 9
    assert both.resolved(cpu, 512, adapter="lora").blocks_to_swap == 2
    assert MemorySettings(blocks_to_swap=8, paired_blocks_to_swap=4).resolved(cpu, 512, paired=True).blocks_to_swap == 4


def test_a_kontext_run_over_nf4_with_the_paired_swap_ends_in_one_line_before_loading(make_cfg):
    """The tier's paired count meets nf4 only in a Kontext run: the run's check says so, before any model loads
    (`run` imports the loading stages only once the settings pass)."""
    from fluxlora.run.train import run

    cfg = make_cfg("model=tiny-kontext", "+vram=16gb", "memory.base_storage=nf4", "memory.blocks_to_swap=0")
    with pytest.raises(FluxLoraError) as e:
        run(cfg)
    assert "memory.paired_blocks_to_swap with memory.base_storage=nf4 is not supported" in str(e.value)
    assert "\n" not in str(e.value)
