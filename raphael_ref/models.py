"""The RAPHAEL denoiser: transformer block (Fig. 3a, Fig. 8b) and the 16-block U-Net (Fig. 8a).

Each transformer block holds four pre-norm residual sublayers in the paper's order:

    x <- x + SelfAttn(LN(x))
    x <- x + CrossAttn(LN(x), E(y))                      h_c: the stream after this sublayer
    x <- x + TimeMoE(LN(x); t_router(E'(t)))              h' : the stream after this sublayer
    x <- x + SpaceMoE(LN(x); Mhat(M), route(E(y)))

M is the same block's cross-attention map (heads averaged, ``attention.cross_attention_map``);
the binary masks Mhat = ``masks.threshold_mask(M, alpha)`` carry no gradient, while the
pooled-token column of M feeds the edge predictor P_theta with gradient (Sec. 3.2). Every
equation is called from its module (attention, masks, gates, experts, space_moe, time_moe,
edge); nothing is re-implemented here. See spec/errata.md for the readings recorded here.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from raphael_ref.attention import cross_attention, sdpa
from raphael_ref.config import PREDICTIONS, DiffusionConfig, ModelConfig, RaphaelConfig
from raphael_ref.diffusion import NoiseSchedule
from raphael_ref.edge import EdgePredictor, pooled_attention_map
from raphael_ref.experts import ExpertBank
from raphael_ref.gates import (DEFAULT_NOISE_STD, GateFFN, interval_route, noise_checkpoint_contexts,
                              per_sample_noise_active, text_route, time_route)
from raphael_ref.masks import threshold_mask
from raphael_ref.paint import PaintWithWords, block_paints, paint_logit_bias, paint_masks
from raphael_ref.space_moe import space_moe
from raphael_ref.time_moe import time_moe
from raphael_ref.unet_parts import (Downsample, GroupNorm32, LayerNorm32, ResBlock, TimestepMLP, Upsample,
                                    sincos_position_embedding)


@dataclasses.dataclass
class BlockAux:
    """What one transformer block reports: routes for path analysis, maps for the edge loss."""

    index: int  # 0..15, in forward order
    grid: tuple[int, int]  # (h, w) of the block's image tokens
    space_routes: torch.Tensor | None  # (B, n_y) long: space expert of each text token
    time_routes: torch.Tensor | None  # (B,) long: time expert of each sample
    pooled_map: torch.Tensor  # (B, 1, h, w): attention map of the pooled (EOT) token, with gradient
    edge_logits: torch.Tensor | None  # (B, 1, h, w): P_theta(pooled_map), None without edge supervision
    masks: torch.Tensor | None = None  # (B, n_x, n_y) bool, only when asked (return_masks=True)
    # router probabilities softmax(G(.) + eps), float32 with gradient, only when asked (return_probs=True):
    # the load-balancing loss (raphael_ref.balance; not in the paper, erratum E73)
    space_probs: torch.Tensor | None = None  # (B, n_y, k)
    time_probs: torch.Tensor | None = None  # (B, n_t); None for the "intervals" router (no gate)
    # the cross-attention map M with gradient, only when asked (return_maps=True): the token-attention loss
    # (raphael_ref.token_attention; not in the paper, erratum E82)
    attn_map: torch.Tensor | None = None  # (B, n_x, n_y)


def _time_moe_impl() -> str:
    """The time-MoE form: "dense" (no host sync) under ``torch.compile``, else "grouped" (least arithmetic).

    Both equal ``time_moe_literal`` (tests/test_time_moe.py); "grouped" is the faster one in eager
    (docs/training.md, "torch.compile"), "dense" the only one without a graph break.
    """
    return "dense" if torch.compiler.is_compiling() else "grouped"


def _space_moe_impl(moe_impl: str) -> str:
    """``model.moe_impl``, except under ``torch.compile``: "gather" has data-dependent shapes (``nonzero``),
    so compiled code runs "dense", the equal form without a graph break (tests/test_space_moe.py)."""
    return "dense" if torch.compiler.is_compiling() else moe_impl


class SelfAttention(nn.Module):
    """Multi-head self-attention over image tokens with fused SDPA kernels."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)  # (B, H, n_x, dh) each
        o = sdpa(q, k, v)  # (B, H, n_x, dh); fused kernels
        return self.out(rearrange(o, "b h n d -> b n (h d)"))  # (B, n_x, width)


class TransformerBlock(nn.Module):
    """RAPHAEL Sec. 3 / Fig. 3a: self-attention, cross-attention, time-MoE, space-MoE (+ P_theta).

    With ``use_time_moe`` / ``use_space_moe`` off, a dense GELU FFN of the same hidden width
    (a one-expert bank, so the same ``expert_ffn``) takes the MoE's place: the ablations of Fig. 6b.
    ``model.expert_act = "geglu"`` makes every expert (and that FFN) a GEGLU FFN, and ``model.num_heads``
    fixes the head count instead of the head width: both for weights converted from Stable Diffusion (E76).
    """

    def __init__(self, width: int, d_y: int, d_t: int, cfg: ModelConfig):
        super().__init__()
        if cfg.num_heads is not None:  # a fixed head count at every width (Stable Diffusion 1.x: 8; E76)
            if width % cfg.num_heads:
                raise ValueError(f"block width {width} is not a multiple of model.num_heads {cfg.num_heads}")
        elif width % cfg.head_dim:
            raise ValueError(f"block width {width} is not a multiple of model.head_dim {cfg.head_dim}")
        self.cfg = cfg
        self.heads = cfg.num_heads if cfg.num_heads is not None else width // cfg.head_dim
        hidden = cfg.expert_mult * width
        act = cfg.expert_act  # "gelu" (the paper) or "geglu" (Stable Diffusion's FFN; E76)
        self.norm1, self.self_attn = LayerNorm32(width), SelfAttention(width, self.heads)
        self.norm2 = LayerNorm32(width)
        self.to_q = nn.Linear(width, width, bias=False)  # W_x^qry
        self.to_k = nn.Linear(d_y, width, bias=False)  # W_y^key
        self.to_v = nn.Linear(d_y, width, bias=False)  # W_y^val
        self.to_out = nn.Linear(width, width)
        self.norm3 = LayerNorm32(width)
        if cfg.use_time_moe:
            if cfg.time_router == "learned":  # "intervals": a fixed function of t (eDiff-I control), no gate
                self.time_gate = GateFFN(d_t, cfg.n_time_experts, hidden=cfg.gate_hidden_mult * d_t)  # G'
            self.time_experts = ExpertBank(cfg.n_time_experts, width, hidden, act=act)  # te_1..te_{n_t}
        else:
            self.time_ffn = ExpertBank(1, width, hidden, act=act)
        self.norm4 = LayerNorm32(width)
        if cfg.use_space_moe:
            self.text_gate = GateFFN(d_y, cfg.n_space_experts, hidden=cfg.gate_hidden_mult * d_y)  # G
            self.space_experts = ExpertBank(cfg.n_space_experts, width, hidden, act=act)  # e_1..e_k
        else:
            self.space_ffn = ExpertBank(1, width, hidden, act=act)
        self.edge = EdgePredictor(cfg.edge_layers, cfg.edge_width) if cfg.use_edge else None

    @property
    def noise_std(self) -> float:
        return DEFAULT_NOISE_STD if self.cfg.gate_noise_std is None else self.cfg.gate_noise_std

    def forward(self, x: torch.Tensor, grid: tuple[int, int], y: torch.Tensor, y_valid: torch.Tensor,
                pooled_index: torch.Tensor, temb: torch.Tensor, return_masks: bool = False,
                fixed_time_routes: tuple[torch.Tensor, torch.Tensor] | None = None, return_probs: bool = False,
                paint=None, return_maps: bool = False):
        """Returns ``(x, (space_routes, time_routes, pooled_map, edge_logits, masks))``; with ``return_probs``
        the tuple also ends with ``(space_probs, time_probs)``, with ``return_maps`` with ``(space_probs,
        time_probs, M)`` (:class:`BlockAux`; the probabilities None unless asked). ``paint``: a
        ``raphael_ref.paint.BlockPaint`` (eDiff-I's paint-with-words: a cross-attention logit bias and the
        painted regions in the space-MoE masks; E77) or None."""
        cfg = self.cfg
        # 1. self-attention
        x = x + self.self_attn(self.norm1(x))  # (B, n_x, w)
        # 2. cross-attention, with the map M (heads averaged, softmax in float32)
        key_valid = None if cfg.attend_padding else y_valid
        q, k = self.to_q(self.norm2(x)), self.to_k(y)  # (B, n_x, w), (B, n_y, w)
        bias = None
        if paint is not None:  # eDiff-I paint-with-words: w log(1 + sigma) max(QK^T / sqrt(d)) P (raphael_ref.paint)
            bias = paint_logit_bias(q, k, self.heads, paint.P, paint.scale, key_valid=key_valid)  # (B, H, n_x, n_y)
        attn, M = cross_attention(q, k, self.to_v(y), self.heads,
                                  key_valid=key_valid, need_map=True,
                                  map_dtype=torch.promote_types(x.dtype, torch.float32),
                                  logit_bias=bias)  # (B, n_x, w), (B, n_x, n_y)
        x = x + self.to_out(attn)  # h_c
        # 3. time-MoE: one expert per sample, chosen from the time embedding
        h = self.norm3(x)
        t_routes, t_probs = None, None
        if cfg.use_time_moe:
            if fixed_time_routes is not None:  # model.time_router = "intervals"
                t_routes, t_w = fixed_time_routes  # (B,), (B,)
            else:
                t_routes, t_w, *p = time_route(self.time_gate, temb, training=self.training, noise_std=self.noise_std,
                                               grad_mode=cfg.gate_grad, return_probs=return_probs)  # (B,), (B,)
                t_probs = p[0] if p else None  # (B, n_t)
            x = x + time_moe(h, t_routes, t_w.to(h.dtype), self.time_experts, check_values=False,
                             impl=_time_moe_impl())  # h'
        else:
            x = x + self.time_ffn.expert(0, h)
        # 4. space-MoE: token i's expert acts on the region Mhat_i of h'
        h = self.norm4(x)
        s_routes, masks, s_probs = None, None, None
        if cfg.use_space_moe:
            with torch.no_grad():
                masks = threshold_mask(M.detach(), cfg.mask_alpha, check_values=False)  # (B, n_x, n_y) bool
                if paint is not None:  # the painted tokens' masks: the region ("replace") or mask OR region ("add")
                    masks = paint_masks(masks, paint.P, paint.mode)
            s_routes, s_w, *p = text_route(self.text_gate, y, training=self.training, noise_std=self.noise_std,
                                           grad_mode=cfg.gate_grad, return_probs=return_probs)  # (B, n_y), (B, n_y)
            s_probs = p[0] if p else None  # (B, n_y, k)
            x = x + space_moe(h, masks, s_routes, s_w.to(h.dtype), self.space_experts, valid=y_valid,
                              count_padding=cfg.count_padding, impl=_space_moe_impl(cfg.moe_impl), check_values=False)
        else:
            x = x + self.space_ffn.expert(0, h)
        # edge supervision on the pooled-token attention map (gradient flows into to_q / to_k)
        pooled = pooled_attention_map(M, pooled_index, *grid, check_values=False)  # (B, 1, h, w)
        edge_logits = self.edge(pooled.to(x.dtype)) if self.edge is not None else None  # (B, 1, h, w)
        out = (s_routes, t_routes, pooled, edge_logits, masks if return_masks else None)
        if return_maps:  # erratum E82: M with gradient for the token-attention loss
            return x, out + (s_probs, t_probs, M)
        return x, (out + (s_probs, t_probs) if return_probs else out)


class SpatialTransformer(nn.Module):
    """GroupNorm -> Linear in -> TransformerBlock -> Linear out (zero-init) -> + residual, on a (B, C, H, W) map."""

    def __init__(self, channels: int, d_y: int, d_t: int, cfg: ModelConfig):
        super().__init__()
        self.norm = GroupNorm32(cfg.norm_groups, channels, eps=cfg.transformer_norm_eps)
        self.proj_in = nn.Linear(channels, channels)
        self.block = TransformerBlock(channels, d_y, d_t, cfg)
        self.proj_out = nn.Linear(channels, channels)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)
        self.pos_embed = cfg.pos_embed
        if cfg.pos_embed == "sincos" and channels % 4:
            raise ValueError(f"model.pos_embed='sincos' needs transformer widths that are multiples of 4, got {channels}")
        self._pe_cache: dict[tuple, torch.Tensor] = {}  # (H, W, device, dtype) -> (n_x, C); not state, not saved

    def position_embedding(self, H: int, W: int, device, dtype) -> torch.Tensor:
        """``sincos_position_embedding(H, W, C)`` on ``device`` in ``dtype``, computed once per grid, device and dtype
        (eager mode); under torch.compile it is traced as ops (the graph folds it)."""
        C = self.proj_in.out_features
        if torch.compiler.is_compiling():
            return sincos_position_embedding(H, W, C).to(device=device, dtype=dtype)
        key = (H, W, torch.device(device), dtype)
        pe = self._pe_cache.get(key)
        if pe is None:
            pe = self._pe_cache[key] = sincos_position_embedding(H, W, C).to(device=device, dtype=dtype)
        return pe

    def forward(self, x, y, y_valid, pooled_index, temb, return_masks=False, fixed_time_routes=None,
                return_probs=False, paint=None, return_maps=False):
        B, C, H, W = x.shape
        h = self.proj_in(rearrange(self.norm(x), "b c h w -> b (h w) c"))  # (B, n_x, C)
        if self.pos_embed == "sincos":  # erratum E72 (not in the paper)
            h = h + self.position_embedding(H, W, h.device, h.dtype)  # (n_x, C) broadcast
        h, aux = self.block(h, (H, W), y, y_valid, pooled_index, temb, return_masks, fixed_time_routes, return_probs,
                            None if paint is None else paint((H, W)), return_maps)
        h = rearrange(self.proj_out(h), "b (h w) c -> b c h w", h=H, w=W)  # (B, C, H, W)
        return x + h, aux


class RaphaelUNet(nn.Module):
    """RAPHAEL's denoiser D_theta(x_t, t, E(y)) (App. 7.3, Fig. 8a): a latent-diffusion U-Net
    whose 16 transformer blocks sit in the Stable Diffusion 1.x layout (2 per level on the first
    three down levels, 1 in the middle, 3 per level on the last three up levels).

    ``forward(x_t, t, y, y_valid, pooled_index)`` -> ``(eps_hat, aux)`` where aux is a list of
    :class:`BlockAux`, one per transformer block in forward order (router probabilities in it only
    with ``return_probs=True``).

    ``schedule``: the run's :class:`~raphael_ref.diffusion.NoiseSchedule`, used only with ``cfg.prediction = "v"``
    (erratum E88): the last layer then outputs v and the forward returns ``eps_from_v(x_t, t, v)``. It is a plain
    attribute, not state; ``build_unet(cfg)`` and ``load_model`` pass the config's own. None: the default
    ``DiffusionConfig`` schedule (scaled_linear, T = 1000) until ``training_losses``, ``sampling.sample`` or the
    diffusers adapter first meet the U-Net with theirs, which it then keeps; a given or kept schedule that differs
    from the one such a call is given is an error (``check_model_schedule``).
    """

    def __init__(self, cfg: ModelConfig, schedule: NoiseSchedule | None = None):
        super().__init__()
        self.cfg = cfg
        if cfg.prediction not in PREDICTIONS:
            raise ValueError(f"model.prediction must be one of {list(PREDICTIONS)}, got {cfg.prediction!r}")
        if schedule is not None and not isinstance(schedule, NoiseSchedule):
            raise ValueError(f"schedule must be a NoiseSchedule or None, got {type(schedule).__name__}")
        self.schedule_given = schedule is not None  # False: the default below, replaced by the first caller's
        if cfg.prediction == "v" and schedule is None:
            d = DiffusionConfig()
            with torch.device("cpu"):  # real float64 tables, also when the U-Net is built on the meta device
                schedule = NoiseSchedule.make(d.schedule, d.T, d.zero_terminal_snr)
        self.schedule = schedule if cfg.prediction == "v" else None
        self._v_tables: dict = {}  # device -> the schedule's float64 tables there (not state; see _eps_from_v)
        mc, groups = cfg.model_channels, cfg.norm_groups
        d_t = 4 * mc  # width of the time embedding E'(t) (d_t of App. 7.3)
        self.d_t = d_t
        self.time_embed = TimestepMLP(mc, d_t)
        self.conv_in = nn.Conv2d(cfg.in_channels + cfg.cond_channels, mc, 3, padding=1)  # + the SR stage's low-res image

        def st(c):
            return SpatialTransformer(c, cfg.d_y, d_t, cfg)

        # down path
        self.down = nn.ModuleList()
        skip_ch, ch = [mc], mc
        levels = len(cfg.channel_mult)
        for lvl, mult in enumerate(cfg.channel_mult):
            for i in range(cfg.num_res_blocks):
                layer = nn.ModuleDict({"res": ResBlock(ch, mc * mult, d_t, groups, cfg.dropout)})
                ch = mc * mult
                if i < cfg.transformer_down[lvl]:
                    layer["attn"] = st(ch)
                self.down.append(layer)
                skip_ch.append(ch)
            if lvl < levels - 1:
                self.down.append(nn.ModuleDict({"downsample": Downsample(ch)}))
                skip_ch.append(ch)
        # middle
        self.mid_res1 = ResBlock(ch, ch, d_t, groups, cfg.dropout)
        self.mid_attn = st(ch) if cfg.transformer_mid else None
        self.mid_res2 = ResBlock(ch, ch, d_t, groups, cfg.dropout)
        # up path (deepest level first)
        self.up = nn.ModuleList()
        for j, lvl in enumerate(reversed(range(levels))):
            mult = cfg.channel_mult[lvl]
            for i in range(cfg.num_res_blocks + 1):
                layer = nn.ModuleDict({"res": ResBlock(ch + skip_ch.pop(), mc * mult, d_t, groups, cfg.dropout)})
                ch = mc * mult
                if i < cfg.transformer_up[j]:
                    layer["attn"] = st(ch)
                if lvl > 0 and i == cfg.num_res_blocks:
                    layer["upsample"] = Upsample(ch)
                self.up.append(layer)
        self.norm_out = GroupNorm32(groups, ch)
        self.conv_out = nn.Conv2d(ch, cfg.in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)
        self.gradient_checkpointing = cfg.checkpoint
        # SR stage (cond_channels > 0; raphael_ref/sr.py, E80): embedding of the noise-augmentation level s, added to
        # E'(t); last layer zero-initialised, so the untrained embedding adds nothing. Built last and only then: the
        # default config draws the same initial weights as before.
        self.aug_embed = None
        if cfg.cond_channels > 0:
            self.aug_embed = TimestepMLP(mc, d_t)
            nn.init.zeros_(self.aug_embed.net[2].weight)
            nn.init.zeros_(self.aug_embed.net[2].bias)

    # ------------------------------------------------------------------ helpers
    def transformer_blocks(self) -> list[TransformerBlock]:
        return [m for m in self.modules() if isinstance(m, TransformerBlock)]

    def _sr_inputs(self, x, cond, aug_level, temb):
        """SR stage (raphael_ref/sr.py, E80): ``[x_t, cond]`` on the channel axis and ``E'(t) + E_s(s)``."""
        C = self.cfg.cond_channels
        if C == 0:
            raise ValueError("cond / aug_level are for an SR stage (model.cond_channels > 0); this U-Net has none")
        if cond is None or aug_level is None:
            raise ValueError(f"this U-Net is an SR stage (model.cond_channels = {C}): pass cond (B, {C}, H, W), the "
                             f"augmented low-res image on x_t's grid (raphael_ref.sr.lowres_condition), and aug_level (B,)")
        B, _, H, W = x.shape
        if cond.shape != (B, C, H, W) or not cond.is_floating_point():
            raise ValueError(f"cond must be a float tensor (B, {C}, H, W) = {(B, C, H, W)} on x_t's grid; got "
                             f"{tuple(cond.shape)} {cond.dtype}")
        if aug_level.shape != (B,) or aug_level.is_floating_point():
            raise ValueError(f"aug_level must be integer levels of shape ({B},); got {tuple(aug_level.shape)} {aug_level.dtype}")
        if not torch.compiler.is_compiling() and not torch.isfinite(cond).all():
            raise ValueError("cond (the low-res conditioning image) contains NaN or inf")
        return torch.cat([x, cond.to(x.dtype)], dim=1), temb + self.aug_embed(aug_level).to(temb.dtype)

    def _run(self, module, *args):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            if not torch.compiler.is_compiling() and per_sample_noise_active():
                # the recomputation replays the per-sample gate-noise streams (train.rng = "sample"; gates.py)
                return checkpoint(module, *args, use_reentrant=False, context_fn=noise_checkpoint_contexts)
            return checkpoint(module, *args, use_reentrant=False)
        return module(*args)

    def _check_inputs(self, x, t, y, y_valid, pooled_index):
        cfg = self.cfg
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"x_t must be (B, {cfg.in_channels}, H, W); got {tuple(x.shape)}")
        B, _, H, W = x.shape
        f = 2 ** (len(cfg.channel_mult) - 1)
        if H % f or W % f:
            raise ValueError(f"x_t height and width must be multiples of {f} (U-Net depth); got {H}x{W}")
        if t.shape != (B,) or t.is_floating_point():
            raise ValueError(f"t must be integer timesteps of shape ({B},); got {tuple(t.shape)} {t.dtype}")
        if y.ndim != 3 or y.shape[0] != B or y.shape[2] != cfg.d_y:
            raise ValueError(f"y (text tokens) must be (B={B}, n_y, d_y={cfg.d_y}); got {tuple(y.shape)}")
        if y_valid.shape != y.shape[:2] or y_valid.dtype != torch.bool:
            raise ValueError(f"y_valid must be a bool tensor of shape {tuple(y.shape[:2])}; got {tuple(y_valid.shape)} {y_valid.dtype}")
        if pooled_index.shape != (B,) or pooled_index.dtype != torch.long:
            raise ValueError(f"pooled_index must be a long tensor of shape ({B},); got {tuple(pooled_index.shape)} {pooled_index.dtype}")
        # the only value checks of a forward (host syncs): inner layers run with check_values=False. Under
        # torch.compile they are skipped (a host sync is a graph break); the shape checks above still run
        # while tracing. A compiled training step still stops on a non-finite loss (train.nonfinite).
        if torch.compiler.is_compiling():
            return
        if not torch.isfinite(x).all():
            raise ValueError("x_t contains NaN or inf")
        if pooled_index.numel() and (pooled_index.min() < 0 or pooled_index.max() >= y.shape[1]):
            raise ValueError(f"pooled_index must lie in [0, n_y - 1 = {y.shape[1] - 1}]; got {pooled_index.tolist()}")
        sched = getattr(self, "schedule", None)  # None also for the ControlNet, which borrows this check
        if sched is not None and t.numel() and (t.min() < 0 or t.max() >= sched.T):
            raise ValueError(f"t must lie in [0, T - 1 = {sched.T - 1}] (this U-Net predicts v with a "
                             f"T = {sched.T} schedule); got {t.tolist()}")

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, y_valid: torch.Tensor,
                pooled_index: torch.Tensor, return_masks: bool = False,
                return_probs: bool = False, paint=None, control_residuals=None,
                cond: torch.Tensor | None = None, aug_level: torch.Tensor | None = None,
                return_maps: bool = False) -> tuple[torch.Tensor, list[BlockAux]]:
        """``paint``: a ``raphael_ref.paint.PaintWithWords`` for this batch (eDiff-I's paint-with-words, E77) or
        None; a spec with weight 0 or nothing painted is ignored (the output is bit for bit the one without).
        ``control_residuals``: a ``raphael_ref.controlnet.ControlResiduals`` (ControlNet, E79), added to the skips and
        the middle output before the decoder reads them; None (default): the forward is unchanged.
        ``cond`` (B, cond_channels, H, W) and ``aug_level`` (B,): the SR stage's augmented low-res image and its
        noise-augmentation level (raphael_ref/sr.py, E80); only for a U-Net with model.cond_channels > 0.
        ``return_maps``: each block's cross-attention map M, with gradient, in ``BlockAux.attn_map`` (the
        token-attention loss, raphael_ref/token_attention.py, E82)."""
        self._check_inputs(x, t, y, y_valid, pooled_index)
        x_t = x  # before the SR stage's concatenation: eps_from_v needs x_t itself (E88)
        block_paint = None
        if paint is not None:
            if not isinstance(paint, PaintWithWords):
                raise ValueError(f"paint must be a raphael_ref.paint.PaintWithWords or None, got {type(paint).__name__}")
            paint.check(x.shape[0], y_valid)
            if paint.active:
                block_paint = block_paints(paint, t, y.shape[1], x.device)  # grid -> BlockPaint
        aux: list[BlockAux] = []
        temb = self.time_embed(t)  # (B, d_t)
        if cond is not None or aug_level is not None or self.aug_embed is not None:  # SR stage (sr.py, E80)
            x, temb = self._sr_inputs(x, cond, aug_level, temb)  # (B, C + cond_channels, H, W), (B, d_t)
        fixed = None
        if self.cfg.use_time_moe and self.cfg.time_router == "intervals":
            routes, w = interval_route(t, self.cfg.n_time_experts, self.cfg.time_router_T)
            fixed = (routes, w.to(temb.dtype))

        def attn(module, h):
            h2, (s_r, t_r, pooled, edge, masks, *probs) = self._run(module, h, y, y_valid, pooled_index, temb,
                                                                    return_masks, fixed, return_probs, block_paint,
                                                                    return_maps)
            aux.append(BlockAux(len(aux), tuple(h.shape[-2:]), s_r, t_r, pooled, edge, masks, *probs))
            return h2

        h = self.conv_in(x)  # (B, mc, H, W)
        skips = [h]
        for layer in self.down:
            if "downsample" in layer:
                h = layer["downsample"](h)
            else:
                h = self._run(layer["res"], h, temb)
                if "attn" in layer:
                    h = attn(layer["attn"], h)
            skips.append(h)
        h = self._run(self.mid_res1, h, temb)
        if self.mid_attn is not None:
            h = attn(self.mid_attn, h)
        h = self._run(self.mid_res2, h, temb)
        if control_residuals is not None:  # ControlNet's zero-conv join (raphael_ref/controlnet.py, E79)
            from raphael_ref.controlnet import add_control

            skips, h = add_control(skips, h, control_residuals)
        for layer in self.up:
            h = self._run(layer["res"], torch.cat([h, skips.pop()], dim=1), temb)
            if "attn" in layer:
                h = attn(layer["attn"], h)
            if "upsample" in layer:
                h = layer["upsample"](h)
        out = self.conv_out(F.silu(self.norm_out(h)))  # (B, in_channels, H, W)
        if self.schedule is not None:  # model.prediction = "v" (E88): out is v; return the eps it implies
            out = self._eps_from_v(x_t, t, out)  # (B, in_channels, H, W)
        return out, aux

    def _eps_from_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``diffusion.eps_from_v`` (spec ``ddpm.eps_from_v``) on the model's device without a host sync, so a
        compiled forward has no graph break: the float64 tables are gathered at t on x_t's device, cast once to the
        compute dtype (float32 or wider: x_t's precision is kept under bf16 autocast). Equal to eps_from_v bit for
        bit (tests/test_models.py). t was checked against the schedule by ``_check_inputs`` (eager)."""
        acc = torch.promote_types(v.dtype, torch.float32)
        key = x_t.device
        tables = self._v_tables.get(key) if not torch.compiler.is_compiling() else None
        if tables is None:
            tables = (self.schedule.sqrt_alphas_cumprod.to(device=key, dtype=torch.float64),
                      self.schedule.sqrt_one_minus_alphas_cumprod.to(device=key, dtype=torch.float64))
            if not torch.compiler.is_compiling():
                self._v_tables[key] = tables
        shape = (-1,) + (1,) * (x_t.dim() - 1)
        c_v = tables[0][t].reshape(shape).to(acc)  # sqrt(abar_t)
        c_x = tables[1][t].reshape(shape).to(acc)  # sqrt(1 - abar_t)
        return c_v * v.to(acc) + c_x * x_t.to(acc)


# ---------------------------------------------------------------------- parameter counts

def count_parameters(model: nn.Module) -> dict[str, int]:
    """Parameters per component: space experts, time experts, gates, attention, edge heads, ResBlocks, other."""
    groups = {"space_experts": 0, "time_experts": 0, "dense_ffn": 0, "gates": 0, "attention": 0,
              "edge_predictors": 0, "resblocks": 0, "other": 0}
    for name, p in model.named_parameters():
        n = p.numel()
        if ".space_experts." in name:
            groups["space_experts"] += n
        elif ".time_experts." in name:
            groups["time_experts"] += n
        elif ".space_ffn." in name or ".time_ffn." in name:
            groups["dense_ffn"] += n
        elif "_gate." in name:
            groups["gates"] += n
        elif ".edge." in name:
            groups["edge_predictors"] += n
        elif any(s in name for s in (".self_attn.", ".to_q.", ".to_k.", ".to_v.", ".to_out.", ".norm1.", ".norm2.",
                                     ".norm3.", ".norm4.", ".proj_in.", ".proj_out.", "attn.norm.")):
            groups["attention"] += n
        elif ".res." in name or "mid_res" in name:
            groups["resblocks"] += n
        else:
            groups["other"] += n
    groups["total"] = sum(groups.values())
    return groups


def schedule_for(cfg: RaphaelConfig) -> NoiseSchedule | None:
    """The schedule a U-Net of ``cfg`` needs: the run's NoiseSchedule with ``model.prediction = "v"``, else None."""
    if cfg.model.prediction != "v":
        return None
    d = cfg.diffusion
    return NoiseSchedule.make(d.schedule, d.T, d.zero_terminal_snr)


def build_unet(cfg: RaphaelConfig) -> RaphaelUNet:
    """``RaphaelUNet(cfg.model)`` with the schedule its prediction needs (``schedule_for``)."""
    return RaphaelUNet(cfg.model, schedule=schedule_for(cfg))


def check_model_schedule(model: nn.Module, schedule: NoiseSchedule, where: str) -> None:
    """A ``model.prediction = "v"`` U-Net (E88) turns v into eps with ``schedule``, the one the caller trains or
    samples with: a U-Net built without one (the default) takes it here and keeps it; one whose given or kept
    schedule differs is refused (its eps would be silently wrong). Wrappers (DDP ``.module``, torch.compile's
    ``_orig_mod``, the SR stage's and ControlNet's ``.unet``) are looked through; a model without a ``schedule``
    attribute (eps) passes."""
    m = model
    while not isinstance(m, RaphaelUNet):  # nested wrappers, e.g. DDP(compile(SRDenoiser(unet)))
        inner = next((getattr(m, a) for a in ("module", "_orig_mod", "unet") if isinstance(getattr(m, a, None), nn.Module)), None)
        if inner is None:
            break
        m = inner
    own = getattr(m, "schedule", None)
    if own is None or own is schedule or not isinstance(schedule, NoiseSchedule):
        return
    if not getattr(m, "schedule_given", True):
        m.schedule, m.schedule_given, m._v_tables = schedule, True, {}
        return
    a, b = own.alphas_cumprod, schedule.alphas_cumprod
    if a.shape != b.shape or not torch.equal(a, b.to(device=a.device, dtype=a.dtype)):
        raise ValueError(f"{where}: this U-Net predicts v (model.prediction='v') and turns it into eps with a "
                         f"different noise schedule (T = {a.numel()}) than the one given here (T = {b.numel()}); "
                         "build it with raphael_ref.models.build_unet(cfg) or load it with checkpoint.load_model, "
                         "which use the config's diffusion schedule")


def build_on_meta(cfg: ModelConfig) -> RaphaelUNet:
    """Build the U-Net on the meta device: shapes and counts without memory."""
    with torch.device("meta"):
        return RaphaelUNet(cfg)  # a "v" U-Net builds its default schedule on the CPU (real float64 tables)


def format_count(n: int) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"
