"""Golden for the whole toy-preset U-Net: a fixed-seed forward (output slice, routes) and loss value.

The weights are not stored: they are re-created from a fixed seed inside ``compute`` (the init is
part of what the golden pins), then cast to the compute dtype. Zero-initialised output layers are
given small random weights so every block influences the output.
"""

from __future__ import annotations

import torch

from raphael_ref.testing.golden import GoldenCase

_B, _S, _NY, _DY = 2, 32, 77, 32


def _model(dtype: torch.dtype):
    from raphael_ref.config import get_preset
    from raphael_ref.models import RaphaelUNet

    # pinned to the toy preset's layout as it was when the golden was made: the preset's later options
    # (E71 / E72: position embedding, caption-only attention; E88: the v output) are not part of what this golden
    # pins (a "v" U-Net's output is eps_from_v of this one's: tests/test_models.py)
    cfg = get_preset("toy", {"model.checkpoint": False, "model.pos_embed": "none", "model.attend_padding": True,
                             "model.count_padding": True, "model.prediction": "eps"}).model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        model = RaphaelUNet(cfg)
        g = torch.Generator().manual_seed(4321)
        with torch.no_grad():
            for p in model.parameters():
                if p.abs().sum() == 0:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.to(dtype).eval()


def _inputs(g: torch.Generator) -> dict[str, torch.Tensor]:
    n_valid = torch.tensor([6, 14])
    valid = torch.arange(_NY)[None] <= n_valid[:, None]  # (B, n_y): SOT..EOT
    return {
        "x0": torch.rand(_B, 3, _S, _S, generator=g, dtype=torch.float64) * 2 - 1,
        "noise": torch.randn(_B, 3, _S, _S, generator=g, dtype=torch.float64),
        "y": torch.randn(_B, _NY, _DY, generator=g, dtype=torch.float64),
        "edge_map": (torch.rand(_B, 1, _S, _S, generator=g, dtype=torch.float64) > 0.8).double(),
        "t": torch.tensor([40, 450]),  # both below T_c so the edge term is live
        "valid": valid,
        "pooled_index": n_valid.clone(),
    }


def _compute(inp: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from raphael_ref.diffusion import NoiseSchedule
    from raphael_ref.objective import training_losses

    dtype = inp["x0"].dtype
    model = _model(dtype).to(inp["x0"].device)
    with torch.no_grad():
        out = training_losses(model, NoiseSchedule.make(T=1000), inp["x0"], inp["t"], inp["noise"], inp["y"],
                              inp["valid"], inp["pooled_index"], inp["edge_map"])
        from raphael_ref.diffusion import q_sample

        eps_hat, _ = model(q_sample(inp["x0"], inp["t"], inp["noise"], NoiseSchedule.make(T=1000)), inp["t"],
                           inp["y"], inp["valid"], inp["pooled_index"])
    return {
        "eps_slice": eps_hat[:, :, ::4, ::4].to(dtype),  # (B, 3, 8, 8) every 4th pixel
        "denoise": out["denoise"].to(dtype),
        "edge": out["edge"].to(dtype),
        "total": out["total"].to(dtype),
    }


def _pos_like(g: torch.Generator) -> dict[str, torch.Tensor]:
    return {"like": torch.zeros(1, dtype=torch.float64)}  # carries the compute dtype only


def _pos_embed(inp):
    from raphael_ref.unet_parts import sincos_position_embedding

    # the toy's coarsest transformer grid with its width, and a non-square grid
    return {"grid6": sincos_position_embedding(6, 6, 64).to(inp["like"].dtype),  # (36, 64)
            "grid3x5": sincos_position_embedding(3, 5, 16).to(inp["like"].dtype)}  # (15, 16)


CASES = [
    # model.pos_embed (option, erratum E72): float32 sin/cos of arguments <= 5 rad; libm and the vectorised
    # (SLEEF) kernels agree to ~2 float32 ulps of the O(1) result: 5e-7 absolute for both dtypes.
    GoldenCase("model.pos_embed", _pos_like, _pos_embed, {"float64": (0.0, 5e-7), "float32": (0.0, 5e-7)},
               float32_reference="the embedding is computed in float32 by design, as timestep_embedding is"),
    GoldenCase(
        id="model.unet",
        make_inputs=_inputs,
        compute=_compute,
        # float32: 16 blocks, ~60 matmul/conv layers deep; each rounds at u = 6e-8 relative and
        # errors add along depth: 1e-4 relative / 1e-5 absolute (outputs are O(0.1..1)).
        # bf16 (whole model cast, norms and softmaxes in float32): u = 3.9e-3 per layer over ~60
        # layers, and threshold masks / gate argmaxes may flip where float64 values sit within
        # that error of a boundary, which moves outputs discretely. Measured (torch 2.14 CPU):
        # float32 max abs error 1.1e-6 on eps, 1.4e-7 on the loss; bf16 3.3e-2 on eps (O(1)
        # values), 2.7e-3 on the loss. 0.1 is ~3x the measured bf16 envelope.
        tol={"float32": (1e-4, 1e-5), "bfloat16": (1e-1, 1e-1)},
        seed=7,
        # Measured across CPUs (ATEN_CPU_CAPABILITY default vs AVX-512): weights differ by 1 ulp32 in
        # 735 of 1036 tensors, the float64 eps by up to 9.2e-7, the loss by 6.8e-9.
        float32_reference="the weights come from torch's float32 initialisers (their last bit depends on the "
                          "CPU's vector width: fused multiply-adds in the AVX2/AVX-512 kernels) and the gate "
                          "softmaxes run in float32",
    )
]
