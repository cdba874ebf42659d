"""The demo's speed table: its rows time the fused ops against their eager counterparts on the same inputs,
and the convolution share comes from a profile of the step it is given."""
import torch

from diffusion_ext import demo_speed


def test_op_rows_name_each_comparison_and_time_both_sides():
    rows = demo_speed.op_rows("cpu", batch=2, size=16, channels=64, reps=1)
    against = [vs for _, vs, _, _ in rows]
    assert against == ["randn_like + eager q_sample", "diffusers-style eager", "F.group_norm + F.silu",
                       "F.dropout (torch's Bernoulli mask)", "naive softmax(q·kᵀ)·v", "F.scaled_dot_product_attention"]
    assert all(e > 0 and f > 0 for _, _, e, f in rows)
    assert "(2, 64, 8, 8)" in rows[2][0] and "(2, 64, 8, 8)" in rows[3][0] and "(2, 2, 64, 32)" in rows[4][0]


def test_op_rows_in_bf16_time_the_activation_rows_as_the_model_runs_them():
    """bf16: the norm, dropout and attention rows on bf16 activations (fp32 γ, β) under autocast, and say so."""
    rows = demo_speed.op_rows("cpu", batch=2, size=16, channels=64, reps=1, precision="bf16")
    assert [what.endswith(", bf16") for what, _, _, _ in rows] == [False, False, True, True, True, True]
    assert all(e > 0 and f > 0 for _, _, e, f in rows)


def test_conv_share_reflects_the_profiled_step():
    conv = torch.nn.Conv2d(16, 16, 3, padding=1)
    x = torch.randn(4, 16, 32, 32)
    only_conv = demo_speed.conv_share(lambda: conv(x))
    no_conv = demo_speed.conv_share(lambda: (x * 2).sum())
    assert only_conv > 0.5 and no_conv == 0.0


def test_markdown_has_every_row_and_the_share():
    class T:
        def min(self, side):
            return {"eager": 0.2, "fused": 0.1}[side]
    rows = [("a", "b", 0.002, 0.001)]
    text = demo_speed.markdown(rows, {"training step": T()}, 0.8)
    assert "| a | b | 2.000 | 1.000 | 2.00× |" in text
    assert "| whole training step | the eager model | 200.0 | 100.0 | 2.00× |" in text
    assert "convolutions took 80%" in text
