"""Text encoders and the VAE are off the training device once latents and prompts are cached: the step sees
only cached tensors, the text encoders are released (garbage), the VAE waits on the host for sampling."""

from __future__ import annotations

import gc
import weakref

import fluxlora.train as train_mod
from fluxlora.module import FluxLoRAModule


def test_encoders_leave_before_the_first_step(make_cfg, monkeypatch):
    captured, at_step, moves = {}, [], []
    load = train_mod.load_components

    def load_and_watch(*a, **kw):
        comps = load(*a, **kw)
        captured.update(comps=comps, clip=weakref.ref(comps.text_encoder), t5=weakref.ref(comps.text_encoder_2))
        return comps

    move = train_mod.move_encoders
    monkeypatch.setattr(train_mod, "load_components", load_and_watch)
    monkeypatch.setattr(train_mod, "move_encoders", lambda c, d: (moves.append(str(d)), move(c, d)))
    step = FluxLoRAModule.training_step

    def watched_step(self, batch, batch_idx):
        if not at_step:
            gc.collect()
            c = captured["comps"]
            at_step.append({"encoders_gone": c.text_encoder is None and c.text_encoder_2 is None,
                            "encoders_freed": captured["clip"]() is None and captured["t5"]() is None,
                            "vae_devices": {p.device.type for p in c.vae.parameters()},
                            "transformer_loaded": c.transformer is not None})
        return step(self, batch, batch_idx)

    monkeypatch.setattr(FluxLoRAModule, "training_step", watched_step)
    cfg = make_cfg("trainer.max_steps=1", "~callbacks.sampler")
    train_mod.run(cfg)
    assert at_step == [{"encoders_gone": True, "encoders_freed": True, "vae_devices": {"cpu"},
                        "transformer_loaded": True}]
    assert moves[-1] == "cpu"  # the last move of the encoders is off the device, before the transformer loads
