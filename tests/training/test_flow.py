"""σ sampling formulas against hand-computed values, packing against diffusers, losses."""

import math

import pytest
import torch
from diffusers import FluxPipeline

from fluxlora.training import flow as fm


def test_shift_sigma_hand_values():
    s = fm.shift_sigma(torch.tensor([0.0, 0.25, 0.5, 1.0]), 3.0)
    # 3σ / (1 + 2σ): 0, 0.75/1.5, 1.5/2, 3/3
    assert torch.allclose(s, torch.tensor([0.0, 0.5, 0.75, 1.0]))


def test_flux_mu_is_linear_between_the_anchors():
    assert fm.flux_mu(256) == pytest.approx(0.5)
    assert fm.flux_mu(4096) == pytest.approx(1.15)
    assert fm.flux_mu(1024) == pytest.approx(0.5 + 0.65 * 768 / 3840)  # 0.63: 512 px has 1024 tokens


def test_flux_time_shift_hand_values():
    half = torch.tensor([0.5])
    assert fm.flux_time_shift(0.0, half).item() == pytest.approx(0.5)
    # e^μ = 3 gives 3 / (3 + 1) = 0.75, the same as a fixed shift of 3
    assert fm.flux_time_shift(math.log(3.0), half).item() == pytest.approx(0.75)
    assert fm.flux_time_shift(math.log(3.0), torch.tensor([0.2])).item() == pytest.approx(
        fm.shift_sigma(torch.tensor([0.2]), 3.0).item())


@pytest.mark.parametrize("mode", fm.SIGMA_MODES)
def test_sample_sigmas_modes_reproduce_their_formula(mode):
    cfg = fm.FlowConfig(timestep_sampling=mode, sigmoid_scale=1.3, discrete_flow_shift=3.1582,
                        logit_mean=0.2, logit_std=0.8)
    got = fm.sample_sigmas(cfg, 64, image_seq_len=1024, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    if mode == "uniform":
        want = torch.rand(64, generator=g)
    elif mode == "logit_normal":
        want = torch.sigmoid(0.2 + 0.8 * torch.randn(64, generator=g))
    elif mode == "sigma":
        want = (torch.randint(0, 1000, (64,), generator=g) + 1).float() / 1000
    else:
        base = torch.sigmoid(1.3 * torch.randn(64, generator=g))
        want = {"sigmoid": base, "shift": 3.1582 * base / (1 + 2.1582 * base),
                "flux_shift": math.exp(0.63) / (math.exp(0.63) + 1 / base - 1)}[mode]
    assert torch.allclose(got, want, atol=1e-6)
    assert ((got > 0) & (got <= 1)).all()


def test_shift_moves_mass_to_high_noise():
    g = torch.Generator().manual_seed(0)
    plain = fm.sample_sigmas(fm.FlowConfig(timestep_sampling="sigmoid"), 4096, 1024, generator=g)
    g = torch.Generator().manual_seed(0)
    shifted = fm.sample_sigmas(fm.FlowConfig(timestep_sampling="shift"), 4096, 1024, generator=g)
    assert plain.mean().item() == pytest.approx(0.5, abs=0.02)
    assert shifted.mean().item() > 0.65


def test_bad_settings_raise():
    with pytest.raises(ValueError, match="timestep_sampling"):
        fm.FlowConfig(timestep_sampling="cosmic")
    with pytest.raises(ValueError, match="loss"):
        fm.FlowConfig(loss="l3")


def test_pack_and_ids_match_diffusers():
    lat = torch.randn(2, 4, 8, 6)
    packed = fm.pack_latents(lat)
    assert torch.equal(packed, FluxPipeline._pack_latents(lat, 2, 4, 8, 6))
    assert torch.equal(fm.unpack_latents(packed, 8, 6), lat)
    ids = FluxPipeline._prepare_latent_image_ids(2, 4, 3, "cpu", torch.float32)
    assert torch.equal(fm.image_ids(8, 6), ids)


def test_noise_endpoints_and_velocity_target():
    x0, eps = torch.randn(3, 5, 4), torch.randn(3, 5, 4)
    sig = torch.tensor([0.0, 1.0, 0.25])
    xt = fm.noise_latents(x0, eps, sig)
    assert torch.equal(xt[0], x0[0]) and torch.equal(xt[1], eps[1])
    assert torch.allclose(xt[2], 0.75 * x0[2] + 0.25 * eps[2])
    # moving along the velocity ε - x0 from x_t by (1-σ) reaches ε
    assert torch.allclose(xt[2] + 0.75 * (eps[2] - x0[2]), eps[2], atol=1e-6)


def test_losses_hand_values():
    pred, tgt = torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.0])
    assert fm.flow_loss(pred, tgt, "l2").item() == pytest.approx(2.5)
    assert fm.flow_loss(pred, tgt, "l1").item() == pytest.approx(1.5)
    want = ((math.sqrt(1 + 0.01) - 0.1) + (math.sqrt(4 + 0.01) - 0.1)) / 2
    assert fm.flow_loss(pred, tgt, "huber", 0.1).item() == pytest.approx(want)
    assert fm.flow_loss(pred.bfloat16(), tgt.bfloat16()).dtype == torch.float32
