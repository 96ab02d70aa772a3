"""fastfvae.fast.flat_adam: D's Adam as one kernel over flat buffers, against torch's Adam
(parameters, moments, step counts, the bf16 weight copy), and its binding to the optimiser."""

import copy

import pytest
import torch
from torch import nn

from fastfvae.fast import flat_adam
from fastfvae.fast.disc_by_hand import DiscriminatorByHand
from fastfvae.fast.flat_adam import FlatAdam, adam_update
from fastfvae.fast.optim import FastAdam
from fastfvae.models.discriminator import Discriminator
from train_data import one_thread  # noqa: F401 (autouse fixture)

BF16 = torch.bfloat16
HYPER = [dict(lr=1e-4, betas=(0.5, 0.9), eps=1e-8), dict(lr=3e-3, betas=(0.9, 0.999), eps=1e-6)]


def twin(module: nn.Module, hyper: dict):
    """(reference module + fused torch Adam, copy + FlatAdam) from the same start."""
    ref, flat = module, copy.deepcopy(module)
    ref_opt = torch.optim.Adam(ref.parameters(), fused=True, **hyper)
    opt = torch.optim.Adam(flat.parameters(), fused=True, **hyper)
    return ref, ref_opt, flat, opt, FlatAdam(opt, list(flat.parameters()), BF16)


def step_both(ref, ref_opt, flat, fa, seed):
    """The same bf16 gradient into both: .grad (as fp32) for torch, the flat buffer for FlatAdam."""
    gen = torch.Generator().manual_seed(seed)
    grads = [(torch.randn(p.shape, generator=gen) * 10 ** -(seed % 4)).to(BF16) for p in ref.parameters()]
    for p, g in zip(ref.parameters(), grads):
        p.grad = g.float()
    ref_opt.step()
    for view, g in zip(fa.grads, grads):
        view.copy_(g)
    fa.step()
    fa.write_back()


def assert_close(got, want, tol, what):
    """max |got - want| <= tol * max |want| (round-off: torch's fused kernel orders the same
    operations differently)."""
    err, scale = (got - want).abs().max().item(), want.abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol} * {scale:.3g}"


def assert_state_equal(ref, ref_opt, flat, opt, tol=1e-6):
    for (name, a), b in zip(ref.named_parameters(), flat.parameters()):
        assert_close(b.detach(), a.detach(), tol, name)
        sa, sb = ref_opt.state[a], opt.state[b]
        assert float(sa["step"]) == float(sb["step"]), name
        for k in ("exp_avg", "exp_avg_sq"):
            assert sb[k].shape == a.shape
            assert_close(sb[k], sa[k], tol, f"{name} {k}")


@pytest.mark.parametrize("hyper", HYPER, ids=["d-betas", "vae-betas"])
@pytest.mark.parametrize("size", [(10, 32, 3), (3, 17, 1), (7, 1000, 2)], ids=str)
def test_flat_adam_matches_torch_adam(hyper, size):
    torch.manual_seed(0)
    ref, ref_opt, flat, opt, fa = twin(Discriminator(*size), hyper)
    for seed in range(6):
        step_both(ref, ref_opt, flat, fa, seed)
        # the bf16 copy is exactly the rounded fp32 parameters
        for w, p in zip(fa.weights, flat.parameters()):
            assert w.dtype == BF16 and torch.equal(w, p.detach().to(BF16))
    assert_state_equal(ref, ref_opt, flat, opt)


def test_the_flat_weights_are_its_own_and_moments_are_views_of_the_flat_buffers():
    _, _, flat, opt, fa = twin(Discriminator(4, 8, 2), HYPER[0])
    params = list(flat.parameters())
    assert sum(p.numel() for p in params) == fa.flat_param.numel() == fa.flat_grad.numel()
    for p in params:
        assert p.untyped_storage().data_ptr() != fa.flat_param.untyped_storage().data_ptr()
        assert opt.state[p]["exp_avg"].untyped_storage().data_ptr() == fa.flat_exp_avg.untyped_storage().data_ptr()
    before = [p.detach().clone() for p in params]
    for view in fa.grads:
        view.fill_(1.0)
    fa.step()  # the parameters are untouched until write_back
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    fa.write_back()
    assert torch.equal(fa.flat_param[:params[0].numel()], params[0].detach().reshape(-1))
    assert not torch.equal(params[0].detach(), before[0])
    with torch.no_grad():
        params[0].add_(1.0)  # a write through the module is taken in by refresh_weights
    fa.refresh_weights()
    assert torch.equal(fa.flat_param[:params[0].numel()], params[0].detach().reshape(-1))
    assert torch.equal(fa.weights[0], params[0].detach().to(BF16))


def test_load_state_dict_rebinds_and_continues_like_torch():
    torch.manual_seed(1)
    ref, ref_opt, flat, opt, fa = twin(Discriminator(5, 16, 2), HYPER[0])
    for seed in range(3):
        step_both(ref, ref_opt, flat, fa, seed)
    saved_model, saved_opt = copy.deepcopy(flat.state_dict()), copy.deepcopy(opt.state_dict())
    for seed in range(3, 5):  # move on, then go back to the saved state (as a resume does)
        step_both(ref, ref_opt, flat, fa, seed)
    flat.load_state_dict(saved_model)
    opt.load_state_dict(copy.deepcopy(saved_opt))  # (load_state_dict may keep the given tensors)
    assert fa.ensure_bound() and not fa.ensure_bound()  # rebinds once
    ref2 = copy.deepcopy(ref)
    ref2.load_state_dict(saved_model)
    ref_opt2 = torch.optim.Adam(ref2.parameters(), fused=True, **HYPER[0])
    ref_opt2.load_state_dict(copy.deepcopy(saved_opt))
    for seed in range(3, 5):
        step_both(ref2, ref_opt2, flat, fa, seed)
    assert_state_equal(ref2, ref_opt2, flat, opt)


def test_state_dict_saves_own_tensors_and_loads_into_a_plain_adam():
    torch.manual_seed(2)
    d = Discriminator(4, 8, 2)
    opt = FastAdam(torch.optim.Adam(d.parameters(), lr=1e-4, betas=(0.5, 0.9)))
    fa = FlatAdam(opt, list(d.parameters()), BF16)
    for view in fa.grads:
        view.normal_()
    fa.step()
    state = opt.state_dict()
    for s in state["state"].values():
        for k in ("exp_avg", "exp_avg_sq"):
            assert s[k].untyped_storage().nbytes() == s[k].numel() * 4  # not a view of the flat buffer
    # the live state still is (state_dict copied, did not edit it)
    assert not fa.ensure_bound()
    plain = torch.optim.Adam(Discriminator(4, 8, 2).parameters(), lr=1e-4, betas=(0.5, 0.9))
    plain.load_state_dict(state)
    assert all(float(s["step"]) == 1.0 for s in plain.state.values())


def test_missing_state_is_created_as_torch_does():
    d = Discriminator(3, 8, 1)
    opt = torch.optim.Adam(d.parameters(), fused=True)
    FlatAdam(opt, list(d.parameters()), BF16)
    for p in d.parameters():
        s = opt.state[p]
        assert s["step"].dtype == torch.float32 and s["step"].dim() == 0 and float(s["step"]) == 0
        assert torch.count_nonzero(s["exp_avg"]) == 0 and s["exp_avg_sq"].shape == p.shape


@pytest.mark.parametrize("kwargs,match", [
    (dict(weight_decay=0.1), "weight decay"), (dict(amsgrad=True), "amsgrad"), (dict(maximize=True), "maximize")])
def test_rejects_what_it_does_not_compute(kwargs, match):
    d = Discriminator(3, 8, 1)
    with pytest.raises(ValueError, match=match):
        FlatAdam(torch.optim.Adam(d.parameters(), **kwargs), list(d.parameters()), BF16)
    with pytest.raises(ValueError, match="optimiser's"):
        FlatAdam(torch.optim.Adam(d.parameters()), list(d.parameters())[:1], BF16)


def test_compile_failure_falls_back_to_the_same_arithmetic(monkeypatch):
    torch.manual_seed(3)
    ref, ref_opt, flat, opt, fa = twin(Discriminator(4, 8, 2), HYPER[0])

    def broken(*args):
        raise RuntimeError("no C++ compiler")
    monkeypatch.setattr(flat_adam, "_kernel", lambda: broken)
    with pytest.warns(RuntimeWarning, match="eagerly"):
        step_both(ref, ref_opt, flat, fa, 0)
    step_both(ref, ref_opt, flat, fa, 1)  # stays eager, no second warning needed
    assert_state_equal(ref, ref_opt, flat, opt)


def test_adam_update_eager_equals_compiled():
    gen = torch.Generator().manual_seed(4)
    tensors = [torch.randn(1000, generator=gen) for _ in range(3)]
    tensors[2] = tensors[2].abs()
    grad = torch.randn(1000, generator=gen).to(BF16)
    scalars = (torch.tensor(1e-3), torch.tensor(0.3))
    outs = []
    for fn in (adam_update, flat_adam._kernel()):
        p, m, v = (t.clone() for t in tensors)
        w = torch.empty(1000, dtype=BF16)
        fn(p, grad, m, v, w, *scalars, *map(torch.tensor, (0.5, 0.9, 0.1, 1e-8)))
        outs.append((p, m, v, w))
    for a, b, what in zip(*outs, ["param", "exp_avg", "exp_avg_sq", "bf16 weights"]):
        assert_close(b.float(), a.float(), 1e-6 if what != "bf16 weights" else 1e-2, what)


def test_by_hand_disc_reads_the_flat_copy_and_writes_flat_grads():
    torch.manual_seed(5)
    disc = Discriminator(6, 16, 2)
    ref = copy.deepcopy(disc)
    opt = torch.optim.Adam(disc.parameters(), fused=True)
    fa = FlatAdam(opt, list(disc.parameters()), BF16)
    d, d_ref = DiscriminatorByHand(disc, 8, BF16), DiscriminatorByHand(ref, 8, BF16)
    d.use_flat(fa)
    z, g = torch.randn(8, 6), torch.randn(8, 2)
    assert torch.equal(d.forward(z), d_ref.forward(z))
    d.param_grads(g)
    d_ref.param_grads(g)
    assert all(p.grad is None for p in disc.parameters())
    for view, p in zip(fa.grads, ref.parameters()):
        assert torch.equal(view, p.grad.to(BF16)), "flat gradients are the bf16 GEMM outputs"
    # an outside write to the parameters (a load) is seen: the copy is refreshed
    with torch.no_grad():
        for p, q in zip(disc.parameters(), ref.parameters()):
            p.mul_(0.5)
            q.mul_(0.5)
    assert torch.equal(d.forward(z), d_ref.forward(z))
