"""The single-GPU teardown frees the module's device memory instead of copying it to the host (fluxlora.run.teardown).

No GPU here: "meta" stands in for the accelerator. Its tensors hold no data, so Lightning's own teardown, which
copies the module to the CPU, raises on them; after the release it has nothing left to copy."""

import lightning as L
import pytest
import torch
from lightning.pytorch.accelerators import CPUAccelerator

from fluxlora.distributed.settings import DistributedSettings, rank_info
from fluxlora.distributed.strategy import build_strategy
from fluxlora.perf.release import release_device_tensors
from fluxlora.run.teardown import ReleasingSingleDeviceStrategy

META = torch.device("meta")


class _Module(L.LightningModule):
    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 3, device=device, dtype=torch.bfloat16)
        self.register_buffer("scale", torch.ones(3, device=device))
        self.host = torch.nn.Parameter(torch.arange(5.0))  # on the host already: left as it is


def test_release_swaps_each_device_tensor_for_an_empty_host_one_and_counts_its_bytes():
    m = _Module(META)
    m.lin.weight.grad = torch.zeros(3, 4, device=META, dtype=torch.bfloat16)

    released = release_device_tensors(m, "meta")

    assert released == (12 + 3) * 2 + 12 * 2 + 3 * 4  # weight, bias, weight's gradient (bf16), buffer (fp32)
    for t in (m.lin.weight, m.lin.bias, m.lin.weight.grad, m.scale):
        assert (t.device.type, t.numel()) == ("cpu", 0)
    assert (m.lin.weight.dtype, m.scale.dtype) == (torch.bfloat16, torch.float32)
    assert isinstance(m.lin.weight, torch.nn.Parameter) and m.lin.weight.requires_grad
    assert torch.equal(m.host, torch.arange(5.0))
    m.cpu()  # what Lightning's teardown does next: nothing left to copy


def _strategy_with(module: L.LightningModule, device: torch.device) -> ReleasingSingleDeviceStrategy:
    strategy = ReleasingSingleDeviceStrategy(device)
    strategy.accelerator = CPUAccelerator()
    strategy._lightning_module = module
    return strategy


def test_teardown_on_an_accelerator_releases_before_lightnings_copy(caplog):
    with pytest.raises(NotImplementedError):  # Lightning's copy alone: meta tensors cannot be copied out
        L.pytorch.strategies.SingleDeviceStrategy.teardown(_strategy_with(_Module(META), META))
    m = _Module(META)
    with caplog.at_level("INFO", logger="fluxlora.run.teardown"):
        _strategy_with(m, META).teardown()
    assert m.lin.weight.numel() == 0 and m.lin.weight.device.type == "cpu"
    assert "teardown: released the module's 0.0 GB on meta" in caplog.text


def test_teardown_on_the_cpu_keeps_the_module():
    m = _Module(torch.device("cpu"))
    weight = m.lin.weight.detach().clone()
    _strategy_with(m, torch.device("cpu")).teardown()
    assert torch.equal(m.lin.weight, weight)


def test_one_process_on_one_gpu_gets_the_releasing_strategy(make_cfg):
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    dist = DistributedSettings()
    cfg = make_cfg()
    info = rank_info(cfg, cpu)
    strategy = build_strategy(cfg, info, dist, cuda)
    assert isinstance(strategy, ReleasingSingleDeviceStrategy) and strategy.root_device == cuda
    assert build_strategy(cfg, info, dist, cpu) == "auto"
    assert build_strategy(make_cfg("trainer.devices=[1]"), info, dist, cuda) == "auto"  # Lightning picks the GPU
    assert build_strategy(make_cfg("trainer.strategy=single_device"), info, dist, cuda) == "single_device"
