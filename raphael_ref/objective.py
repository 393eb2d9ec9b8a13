"""The RAPHAEL training objective assembled from its equation modules (Sec. 2 and 3.2).

    x_t    = q_sample(x_0, t, eps)                          (ddpm.q_sample, erratum E1 corrected)
    L_den  = ||eps - D_theta(x_t, t, E(y))||^2               (ddpm.loss_eps, per sample)
    L_edge = Focal(P_theta(M_pooled), I_edge) per block      (focal.focal_loss_per_sample)
    L      = L_den + 1[t < T_c] L_edge                       (losses.total_loss)
    L     += c_bal L_bal, only when c_bal > 0 (not the paper)  (balance.model_balance_loss, erratum E73)
    L     += c_tok L_tok, only when c_tok > 0 (not the paper)  (token_attention.model_token_attention_loss, E82)

Nothing is re-implemented here: this module only wires the model's outputs into those functions.
"""

from __future__ import annotations

import torch

from raphael_ref.balance import model_balance_loss
from raphael_ref.diffusion import NoiseSchedule, loss_eps, q_sample
from raphael_ref.diffusion.schedule import gather_float64
from raphael_ref.edge import edge_target_to_grid
from raphael_ref.focal import focal_loss_per_sample
from raphael_ref.losses import total_loss
from raphael_ref.models import BlockAux, RaphaelUNet, check_model_schedule
from raphael_ref.token_attention import TokenTargets, model_token_attention_loss


def edge_losses(aux: list[BlockAux], edge_map: torch.Tensor, alpha: float = 0.5, gamma: float = 2.0) -> torch.Tensor:
    """Focal edge loss of every block that has an edge head: (n_blocks, B).

    ``edge_map`` (B, 1, H, W) in [0, 1] is the edge map of the training image (HED or Canny),
    resized to each block's grid by ``edge.edge_target_to_grid``.
    """
    if not bool(((edge_map >= 0) & (edge_map <= 1)).all()):  # checked once here, not per block
        raise ValueError("edge_map must hold edge probabilities in [0, 1] (NaN or out-of-range values found)")
    rows = []
    for a in aux:
        if a.edge_logits is None:
            continue
        acc = torch.promote_types(a.edge_logits.dtype, torch.float32)  # bf16/fp16 logits -> float32 loss
        target = edge_target_to_grid(edge_map.to(acc), *a.grid)  # (B, 1, h, w)
        rows.append(focal_loss_per_sample(a.edge_logits.to(acc), target, alpha=alpha, gamma=gamma,
                                          check_values=False))  # (B,)
    if not rows:
        raise ValueError("no block has an edge head (model.use_edge is False); pass edge_map=None")
    return torch.stack(rows)  # (n_blocks, B)


LOSS_WEIGHTS = ("none", "v")


def denoise_weights(schedule: NoiseSchedule, t: torch.Tensor, kind: str = "none",
                    max_weight: float | None = None) -> torch.Tensor:
    """Per-sample weight w(t) of L_denoise, (B,) float64 on t's device. Not in the paper (erratum E70).

    ``"none"``: w = 1, the paper's ||eps - eps_hat||^2.
    ``"v"``: w = (1 / abar_t) / mean_s (1 / abar_s). Since ||eps - eps_hat||^2 = SNR ||x0 - x0_hat||^2 and
    1 / abar = (SNR + 1) / SNR, the weighted eps loss is the v-prediction loss (Salimans & Ho, 2022),
    (SNR + 1) ||x0 - x0_hat||^2, up to the constant mean: the network, its output and the sampler stay
    the paper's; only how much each noise level counts changes. Normalised to mean 1 over t so the
    loss scale (and gradient clipping) stay comparable.
    ``max_weight`` (``"v"`` only; None: no cap): w = min(1 / abar_t, max_weight) / mean_s min(1 / abar_s, max_weight),
    so the weight of the high noise levels is at most ``max_weight`` times that of the lowest ones (whose
    weight 1 / abar ~ 1 is the paper's). Uncapped, the levels t < T/4 get ~1.4% of the total weight under
    ``scaled_linear`` and the last denoising steps stay undertrained (erratum E71).
    """
    if kind == "none":
        return torch.ones(t.shape, dtype=torch.float64, device=t.device)
    if kind != "v":
        raise ValueError(f"loss weighting must be one of {LOSS_WEIGHTS}, got {kind!r}")
    inv = 1.0 / schedule.alphas_cumprod  # (T,) float64, CPU
    if max_weight is not None:
        if isinstance(max_weight, bool) or not isinstance(max_weight, (int, float)) or not max_weight >= 1.0 \
                or max_weight == float("inf"):
            raise ValueError(f"max_weight must be None or a finite number >= 1 (1 gives the paper's uniform "
                             f"weighting), got {max_weight!r}")
        inv = inv.clamp(max=float(max_weight))  # (T,)
    return gather_float64(inv / inv.mean(), t, t).to(t.device)  # (B,), t checked against [0, T)


def training_losses(model: RaphaelUNet | torch.nn.Module, schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor,
                    noise: torch.Tensor, y: torch.Tensor, y_valid: torch.Tensor, pooled_index: torch.Tensor,
                    edge_map: torch.Tensor | None = None, *, focal_alpha: float = 0.5,
                    focal_gamma: float = 2.0, loss_weight: str = "none",
                    loss_weight_max: float | None = None, balance_loss: float = 0.0, token_loss: float = 0.0,
                    token_targets: TokenTargets | None = None) -> dict[str, torch.Tensor]:
    """One evaluation of L = L_denoise + L_edge on a batch; returns {total, denoise, edge, aux}.

    x0 (B, C, H, W) latents (or pixels for the toy preset); t (B,) 0-based timesteps; noise like x0;
    y (B, n_y, d_y), y_valid (B, n_y) bool, pooled_index (B,) from the text encoder; edge_map
    (B, 1, H', W') in [0, 1], required when ``model.cfg.use_edge`` (None otherwise).
    ``balance_loss`` > 0 (not in the paper, erratum E73): total += balance_loss * L_bal, the mean
    Switch-Transformer load-balancing loss of the MoE layers (``balance.model_balance_loss``), returned
    unweighted under ``"balance"``; 0 (default) leaves the paper's loss and forward untouched.
    ``token_loss`` > 0 (not in the paper, erratum E82): total += token_loss * L_tok, TokenCompose's token loss
    on the blocks' cross-attention maps against ``token_targets`` (``token_attention.token_targets``: the
    synthetic scenes' object masks), returned unweighted under ``"token"``; 0 (default): untouched.
    """
    if isinstance(balance_loss, bool) or not isinstance(balance_loss, (int, float)) \
            or not 0.0 <= balance_loss < float("inf"):
        raise ValueError(f"balance_loss must be a finite number >= 0 (0: off, the paper), got {balance_loss!r}")
    if isinstance(token_loss, bool) or not isinstance(token_loss, (int, float)) \
            or not 0.0 <= token_loss < float("inf"):
        raise ValueError(f"token_loss must be a finite number >= 0 (0: off, the paper), got {token_loss!r}")
    if token_loss > 0 and not isinstance(token_targets, TokenTargets):
        raise ValueError("token_loss > 0 needs token_targets (raphael_ref.token_attention.token_targets of the "
                         "batch's synthetic scenes), got " + type(token_targets).__name__)
    cfg = getattr(model, "module", model).cfg  # the model's config, also through a DDP wrapper (.module)
    check_model_schedule(model, schedule, "training_losses")  # a "v" U-Net's v -> eps schedule (E88)
    x_t = q_sample(x0, t, noise, schedule)  # (B, C, H, W)
    extra = {}
    if balance_loss > 0:
        extra["return_probs"] = True
    if token_loss > 0:
        extra["return_maps"] = True
    eps_hat, aux = model(x_t, t, y, y_valid, pooled_index, **extra)
    acc = torch.promote_types(eps_hat.dtype, torch.float32)  # the loss of a bf16/fp16 model in float32
    denoise = loss_eps(eps_hat.to(acc), noise.to(acc), reduction="none")  # (B,)
    if loss_weight != "none":
        denoise = denoise * denoise_weights(schedule, t, loss_weight, loss_weight_max).to(acc)  # (B,), erratum E70
    if cfg.use_edge and edge_map is None:
        raise ValueError("the model has edge supervision on (model.use_edge) but no edge_map was given: "
                         "pass the batch's edge maps (raphael_ref.edge_gt.make_edge_detector) or set model.use_edge=false")
    edge = edge_losses(aux, edge_map, focal_alpha, focal_gamma) if cfg.use_edge else None  # (n_blocks, B)
    out = total_loss(denoise, edge, t, cfg.edge_t_cutoff)
    if balance_loss > 0:  # erratum E73
        out["balance"] = model_balance_loss(aux, y_valid).to(out["total"].dtype)  # ()
        out["total"] = out["total"] + balance_loss * out["balance"]
    if token_loss > 0:  # erratum E82
        maps = [(a.attn_map, a.grid) for a in aux if a.attn_map is not None]
        out["token"] = model_token_attention_loss(maps, token_targets).to(out["total"].dtype)  # ()
        out["total"] = out["total"] + token_loss * out["token"]
    out["aux"] = aux
    return out
