"""RoPE context extension: PI, NTK-aware and YaRN frequency tables and YaRN's attention temperature, checked
against the published formulas written out here independently (plain Python floats, one loop per formula)."""

import math

import pytest
import torch

from pope_lm.config import ConfigError, load_config
from pope_lm.position import RoPE
from pope_lm.rope_scaling import attention_logit_scale, rope_inverse_frequencies

D, BASE, L = 64, 10000.0, 1024


def trained(d: int = D, base: float = BASE) -> list[float]:
    return [base ** (-2 * i / d) for i in range(d // 2)]


def pi_paper(s: float) -> list[float]:
    # Chen et al. 2023: position m becomes m / s, i.e. every frequency is divided by s.
    return [f / s for f in trained()]


def ntk_paper(s: float) -> list[float]:
    # bloc97 / YaRN eq. 16: b' = b * s^(|D| / (|D| - 2)).
    base = BASE * s ** (D / (D - 2))
    return [base ** (-2 * i / D) for i in range(D // 2)]


def yarn_paper(s: float, d: int = D, length: int = L, alpha: float = 1.0, beta: float = 32.0) -> list[float]:
    # YaRN eqs. 17-20: r(d) = L / lambda_d, lambda_d = 2 pi / theta_d; h(theta_d) = (1 - g) theta_d / s + g theta_d.
    out = []
    for theta_d in trained(d):
        r = length / (2 * math.pi / theta_d)
        g = 0.0 if r < alpha else 1.0 if r > beta else (r - alpha) / (beta - alpha)
        out.append((1 - g) * theta_d / s + g * theta_d)
    return out


def table(scaling: str, s: float) -> list[float]:
    return rope_inverse_frequencies(D, BASE, scaling, s, L).tolist()


@pytest.mark.parametrize("s", [2.0, 4.0, 10.0])
def test_position_interpolation_divides_every_frequency_by_s(s):
    assert table("pi", s) == pytest.approx(pi_paper(s), rel=1e-12)


@pytest.mark.parametrize("s", [2.0, 4.0, 10.0])
def test_ntk_aware_changes_the_base_and_interpolates_the_lowest_frequency_by_exactly_s(s):
    freqs = table("ntk", s)
    assert freqs == pytest.approx(ntk_paper(s), rel=1e-12)
    assert freqs[0] == 1.0 and freqs[-1] == pytest.approx(trained()[-1] / s, rel=1e-12)


@pytest.mark.parametrize("s", [2.0, 4.0, 10.0])
def test_yarn_ramp_keeps_fast_dimensions_interpolates_slow_ones_and_blends_between(s):
    freqs, ref, base = table("yarn", s), yarn_paper(s), trained()
    assert freqs == pytest.approx(ref, rel=1e-12)
    rotations = [L * f / (2 * math.pi) for f in base]
    regimes = {"kept": 0, "interpolated": 0, "ramp": 0}
    for f, b, r in zip(freqs, base, rotations, strict=True):
        if r > 32:
            assert f == pytest.approx(b, rel=1e-12)
            regimes["kept"] += 1
        elif r < 1:
            assert f == pytest.approx(b / s, rel=1e-12)
            regimes["interpolated"] += 1
        else:
            assert b / s < f < b or r in (1.0, 32.0)
            regimes["ramp"] += 1
    assert all(regimes.values()), regimes  # this head dim and length exercise all three cases


def test_yarn_attention_temperature_is_0_1_ln_s_plus_1_on_q_and_k():
    for s in (1.0, 2.0, 4.0, 16.0):
        assert attention_logit_scale("yarn", s) == pytest.approx((0.1 * math.log(s) + 1) ** 2, rel=1e-15)
        assert attention_logit_scale("pi", s) == attention_logit_scale("ntk", s) == 1.0


def test_no_scaling_and_factor_one_give_the_trained_table():
    assert table("none", 1.0) == pytest.approx(trained(), rel=1e-15)
    for scaling in ("pi", "ntk", "yarn"):
        assert table(scaling, 1.0) == pytest.approx(trained(), rel=1e-12)


def test_rope_attention_with_yarn_matches_a_direct_evaluation():
    # RoPE rotates in fp32 whatever the input dtype (angles reach 1e4 rad), hence the fp32 tolerance.
    torch.manual_seed(0)
    head_dim, n, s, original = 16, 12, 4.0, 8
    rope = RoPE(head_dim, BASE, "yarn", s, original).double()
    q, k, v = (torch.randn(1, 2, n, head_dim, dtype=torch.float64) for _ in range(3))
    freqs = torch.tensor(yarn_paper(s, head_dim, original), dtype=torch.float64)
    angle = torch.arange(n, dtype=torch.float64)[:, None] * freqs  # (n, D/2)
    cos, sin = angle.cos(), angle.sin()

    def rotate(x: torch.Tensor) -> torch.Tensor:  # pair (i, i + D/2) rotated by angle_i
        a, b = x[..., : head_dim // 2], x[..., head_dim // 2 :]
        return torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1)

    temperature = (0.1 * math.log(s) + 1) ** 2
    scores = temperature * rotate(q) @ rotate(k).transpose(-1, -2) / math.sqrt(head_dim)
    scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    expected = scores.softmax(-1) @ v
    torch.testing.assert_close(rope.attend(q, k, v), expected, rtol=1e-5, atol=1e-5)


def test_bad_scaling_settings_are_refused():
    with pytest.raises(ValueError, match="factor must be >= 1"):
        rope_inverse_frequencies(D, BASE, "yarn", 0.5)
    with pytest.raises(ValueError, match="must be one of"):
        rope_inverse_frequencies(D, BASE, "linear", 2.0)
    with pytest.raises(ConfigError, match=r"'model.rope_scaling_type' must be one of none, pi, ntk, yarn"):
        load_config("recipes/tiny.yaml", ["model.rope_scaling_type=dynamic"])
