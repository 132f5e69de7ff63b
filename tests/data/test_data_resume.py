"""A run resumed from a checkpoint continues the data order exactly: the same samples, captions and caption drops, in
the same order, as a run that was never interrupted (checked through Lightning 2.6's real mid-epoch resume)."""

import time

import lightning as L
import pytest
import torch
from helpers.data_fakes import FakeEncoder, interrupt_at, make_folder, recording_module

from fluxlora.data import FluxDataModule
from fluxlora.errors import StageTimeoutError

EPOCHS, BATCHES_PER_EPOCH = 3, 5


def _dm(tmp_path, make_cfg, workers):
    a, b = tmp_path / "a", tmp_path / "b"
    if not a.exists():
        make_folder(a, 3, (64, 64))
        make_folder(b, 2, (128, 64), caption="bee, red, green, blue")
    cfg = make_cfg("data=folder", f"data.path={a}", "data.buckets.min_size=64", "data.batch_size=2",
                   "data.num_repeats=2", f"data.num_workers={workers}", "data.timeout=20",
                   f"+data.subsets=[{{path: {b}, shuffle_caption: true, keep_tokens: 1, caption_dropout_rate: 0.3}}]")
    dm = FluxDataModule(cfg.data, cache_dir=tmp_path / "cache", seed=5)
    dm.build_cache(FakeEncoder(), "fake")
    assert dm.batches_per_epoch() == BATCHES_PER_EPOCH  # 6 samples of 64x64 and 4 of 128x64, batches of 2
    return dm


def _trainer(tmp_path, *callbacks, **kw):
    return L.Trainer(max_epochs=EPOCHS, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, callbacks=list(callbacks),
                     default_root_dir=str(tmp_path), **kw)


def _checkpointing(tmp_path):
    return L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_last=True,
                                               save_top_k=-1, filename="{step}")


@pytest.mark.parametrize("stop_after,workers", [(3, 0), (5, 0), (7, 0), (5, 2), (7, 2)])
def test_resumed_run_continues_the_sample_order_exactly(tmp_path, make_cfg, stop_after, workers):
    whole = recording_module()
    _trainer(tmp_path / "whole").fit(whole, datamodule=_dm(tmp_path, make_cfg, workers))
    assert len(whole.seen) == EPOCHS * BATCHES_PER_EPOCH * 2
    assert any(s[2] for s in whole.seen) and len({s[1] for s in whole.seen}) > 1  # drops and variants happen

    first = recording_module()
    with pytest.raises(RuntimeError, match=f"interrupted before batch {stop_after}"):
        _trainer(tmp_path / "run", _checkpointing(tmp_path), interrupt_at(stop_after)).fit(
            first, datamodule=_dm(tmp_path, make_cfg, workers))
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert ckpt["FluxDataModule"]["epoch"] == stop_after // BATCHES_PER_EPOCH
    assert ckpt["FluxDataModule"]["batches_done"] == stop_after % BATCHES_PER_EPOCH

    second = recording_module()
    with _no_resume_warning():
        _trainer(tmp_path / "run", _checkpointing(tmp_path)).fit(
            second, datamodule=_dm(tmp_path, make_cfg, workers), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert first.seen == whole.seen[:2 * stop_after]
    assert first.seen + second.seen == whole.seen  # nothing repeated, nothing skipped, same captions


class _no_resume_warning:
    """Lightning's 'dataloader is not resumable' warning must not appear: the data module resumes the order."""

    def __enter__(self):
        import warnings

        self._catch = warnings.catch_warnings(record=True)
        self.records = self._catch.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        self._catch.__exit__(*exc)
        assert not [w for w in self.records if "not resumable" in str(w.message)]
        return False


def test_stopped_worker_ends_a_lightning_run_within_the_timeout(tmp_path, make_cfg):
    import os
    import signal

    dm = _dm(tmp_path, make_cfg, workers=1)
    dm.cfg.timeout = 2
    stopped = {}

    class StopWorkers(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if not stopped:
                for w in trainer.train_dataloader._iterator._workers:
                    os.kill(w.pid, signal.SIGSTOP)
                stopped["workers"] = list(trainer.train_dataloader._iterator._workers)
            stopped["last_batch_end"] = time.monotonic()

    with pytest.raises(StageTimeoutError, match="stage 'data loading' made no progress for 2s"):
        _trainer(tmp_path, StopWorkers()).fit(recording_module(), datamodule=dm)
    waited = time.monotonic() - stopped["last_batch_end"]
    assert waited < 2 + 3, waited  # the timeout (+1 s grace of the stall watch) plus scheduling
    assert not any(w.is_alive() for w in stopped["workers"])
