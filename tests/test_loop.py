"""The shared training loop: each caller's learning rates to the float, clipping, the stop on a non-finite loss,
gradient or weight (before the step that would apply it), hooks and early stops."""

import math

import pytest

from edgevlm.errors import EdgeVLMError

torch = pytest.importorskip("torch")
loop = pytest.importorskip("edgevlm.train.loop")


def test_the_schedule_warms_up_then_decays_to_its_floor():
    cosine = loop.Schedule(1e-3, steps=100, warmup=10)
    assert cosine(0) == pytest.approx(1e-4) and cosine(9) == pytest.approx(1e-3) and cosine(10) == pytest.approx(1e-3)
    assert cosine(55) == pytest.approx(0.55e-3)  # halfway down the cosine
    assert cosine(100) == pytest.approx(1e-4)  # a tenth, reached at the end
    assert all(cosine(s) > cosine(s + 1) for s in range(10, 99))
    assert loop.Schedule(1e-3, steps=5, warmup=0)(0) == pytest.approx(1e-3)  # no warmup: the full rate at once
    linear = loop.Schedule(2e-3, steps=100, warmup=30, decay="linear")
    assert linear(0) == pytest.approx(2e-3 / 30)  # warmup and decay together from the first step
    assert linear(29) == pytest.approx(2e-3 * (0.1 + 0.9 * 0.71))
    assert linear(100) == pytest.approx(2e-4)
    flat = loop.Schedule(1e-3, steps=100, warmup=30, decay=None)
    assert flat(14) == pytest.approx(0.5e-3) and flat(29) == flat(99) == 1e-3


@pytest.mark.parametrize("lr", [1e-3, 2e-3, 3e-3, 7.3e-4])
def test_the_schedule_gives_each_caller_the_floats_its_own_loop_computed(lr):
    """The rates tune and the demo's pretraining computed before they shared the loop, to the last bit: a rate
    one ulp off changes the trained weights."""
    for steps, warmup in [(1000, 50), (1500, 50), (20, 5), (6, 1), (4, 0)]:
        tune = loop.Schedule(lr, steps, warmup)
        for step in range(steps):
            expected = (lr * (step + 1) / warmup if step < warmup else
                        lr * (0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))))
            assert tune(step) == expected
    for steps in (400, 2000, 60):
        copying, vision = loop.Schedule(lr, steps, 30, decay=None), loop.Schedule(lr, steps, 30, decay="linear")
        for step in range(steps):
            assert copying(step) == lr * min(1.0, (step + 1) / 30)
            assert vision(step) == lr * min(1.0, (step + 1) / 30) * (0.1 + 0.9 * (1 - step / steps))


def regression(scale=1.0):
    """A linear model, its parameters and a loss over fixed data (`scale` makes the gradients as large as wanted)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    return model, list(model.parameters()), lambda step: scale * torch.nn.functional.mse_loss(model(x), y + 100)


def train(clip):
    """Three steps of the regression; the last step's gradient norm, the rate at each step and the optimizer."""
    model, params, loss_of = regression()
    optimizer, rates = loop.adamw(params, 1e-2), []
    loop.run(params, optimizer, loss_of, loop.Schedule(1e-2, 3, warmup=2), out="m", clip=clip,
             on_step=lambda done, loss: rates.append(optimizer.param_groups[0]["lr"]))
    return float(torch.nn.utils.get_total_norm([p.grad for p in params])), rates, optimizer


def test_a_step_clips_the_gradient_norm_and_follows_the_schedule():
    (clipped, rates, optimizer), (unclipped, _, _) = train(0.5), train(None)
    assert clipped == pytest.approx(0.5) and unclipped > 10  # clipped to the bound; unclipped, far above it
    assert rates == [loop.Schedule(1e-2, 3, warmup=2)(s) for s in range(3)] == [5e-3, 1e-2, 1e-2]
    assert optimizer.defaults["betas"] == (0.9, 0.98) and optimizer.defaults["weight_decay"] == 0.01


def test_a_hook_returning_true_stops_the_run_there():
    model, params, loss_of = regression()
    seen = []
    loop.run(params, loop.adamw(params, 1e-2), loss_of, loop.Schedule(1e-2, 10, warmup=1),
             out="m", start=2, on_step=lambda done, loss: seen.append((done, loss)) or done == 5)
    assert [done for done, _ in seen] == [3, 4, 5] and all(isinstance(loss, float) for _, loss in seen)
    assert seen[0][1] > seen[-1][1]  # it trains


@pytest.mark.parametrize("bad, check, message, done", [
    ("loss", True, "the loss is nan at copy pretraining step 3/10", [1, 2]),
    ("gradient", True, "the gradients are not finite at copy pretraining step 3/10", [1, 2]),
    ("gradient", False, "the loss is nan at copy pretraining step 4/10", [1, 2, 3]),  # stepped on: NaN weights
])
def test_a_non_finite_loss_or_gradient_stops_before_its_step_with_one_line(bad, check, message, done):
    model, params, loss_of = regression()

    def poisoned(step):
        if step < 2:
            return loss_of(step)
        if bad == "loss":
            return loss_of(step) * float("nan")
        return torch.sqrt(params[0] - params[0].detach()).sum()  # 0, with an infinite gradient

    seen = []
    with pytest.raises(EdgeVLMError) as error:
        loop.run(params, loop.adamw(params, 1e-2), poisoned, loop.Schedule(1e-2, 10, warmup=1), out="m",
                 check_gradients=check, name="copy pretraining step", on_step=lambda n, loss: seen.append(n))
    assert str(error.value) == (f"training diverged: {message}; lower the learning rate (it was 0.01) and train "
                                "again (m is unchanged)")
    assert seen == done and all(torch.isfinite(p).all() for p in params) == check  # checked: the step not taken


def test_weights_a_last_step_overflowed_are_reported():
    model, params, loss_of = regression(scale=1e30)  # a finite loss, gradients of 1e32: a step of 1e42
    with pytest.raises(EdgeVLMError, match="the weights are not finite at step 1/1"):
        loop.run(params, torch.optim.SGD(params, lr=1.0), loss_of, loop.Schedule(1e10, 1, warmup=0), out="m",
                 clip=None)
