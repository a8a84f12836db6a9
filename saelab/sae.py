"""`SparseCoder`: the one SAE module every selection rule shares.

z = W_enc (x − b_dec) + b_enc, a = rule(z), x̂ = W_decᵀ a + b_dec, with W_dec's rows kept
at unit norm (Gao et al. 2024, arXiv 2406.04093). The SAE works on activations multiplied
by `input_scale` (chosen so that E‖x·s‖² = d_in); `encode`, `decode` and `forward` take and
return the model's own units, the `*_scaled` methods work in the SAE's.

Mixed precision: parameters stay in their own dtype (float32 master weights); with
`compute_dtype` set to bfloat16 the encoder GEMM, the decoder gather and their sparse
backward run on bf16 copies (differentiable casts, so gradients land in float32), while
b_dec is added and losses are taken in float32.

On disk: `sae.safetensors` (tensors only) beside `cfg.json` (arch, d_in, d_sae, k,
input_scale, and whatever the trainer adds).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from saelab import kernels
from saelab.archs import ARCHS, Code, EncodeArgs, Encoding, RaggedCode, SparseCode, to_padded
from saelab.errors import UserError
from saelab.runs import CFG, WEIGHTS, atomic_write, write_json


class SparseCoder(nn.Module):
    threshold: Tensor
    """Inference threshold(s) of batch-level rules (a buffer; absent for other rules)."""

    compute_dtype: torch.dtype
    """dtype of the SAE's matmuls (set by the trainer's precision; not saved)."""

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        k: int,
        arch: str = "topk",
        input_scale: float = 1.0,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        beta: float = 1.0,
    ):
        super().__init__()
        if arch not in ARCHS:
            raise UserError(f"unknown arch '{arch}'; valid: {', '.join(ARCHS)}")
        if not 0 < k < d_sae:
            raise UserError(f"k={k} must satisfy 0 < k < d_sae={d_sae}")
        self.d_in, self.d_sae, self.k, self.arch = d_in, d_sae, k, arch
        self.spec = ARCHS[arch]
        self.input_scale = float(input_scale)
        self.beta = float(beta)
        self.compute_dtype = dtype
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        self.W_enc = nn.Parameter(torch.empty(d_sae, d_in, **kw), self.spec.uses_encoder)
        self.b_enc = nn.Parameter(torch.zeros(d_sae, **kw), self.spec.uses_encoder)
        self.W_dec = nn.Parameter(torch.empty(d_sae, d_in, **kw))
        self.b_dec = nn.Parameter(torch.zeros(d_in, **kw))
        if self.spec.threshold != "none":
            # Inference thresholds of batch-level rules, NaN until training sets them; an
            # inference-only rule (jumprelu) starts at 0, the plain ReLU SAE.
            shape = d_sae if self.spec.threshold == "latent" else 1
            fill = float("nan") if self.spec.trainable else 0.0
            self.register_buffer("threshold", torch.full((shape,), fill, **kw))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Random unit decoder rows, tied encoder (W_enc = W_dec), zero biases."""
        w = torch.randn(self.W_dec.shape, generator=generator, device=self.W_dec.device)
        self.W_dec.copy_(w / w.norm(dim=1, keepdim=True))
        self.W_enc.copy_(self.W_dec)
        self.b_enc.zero_()
        self.b_dec.zero_()

    # ---- maths in the SAE's scaled units -------------------------------------------

    def encode_scaled(self, x: Tensor, args: EncodeArgs | None = None) -> Encoding:
        return self.spec.encode(self, x, args or EncodeArgs())

    def decode_scaled(self, code: Code) -> Tensor:
        """x̂ in the parameters' dtype: the gather in compute_dtype, b_dec added after."""
        c = self.compute
        if isinstance(code, RaggedCode):
            v, idx, offsets = code
            out = kernels.ragged_decode(c(v), idx, offsets, c(self.W_dec), None)
        else:
            out = kernels.decode(c(code.values), code.indices, c(self.W_dec), None)
        return out.to(self.b_dec.dtype) + self.b_dec

    def compute(self, t: Tensor) -> Tensor:
        """t in compute_dtype, by a differentiable cast (t itself when it is already)."""
        return t if t.dtype == self.compute_dtype else t.to(self.compute_dtype)

    def pre_acts(self, x: Tensor) -> Tensor:
        """Dense z = W_enc (x − b_dec) + b_enc, [B, d_sae]; for analysis, never for training."""
        return torch.addmm(self.b_enc, x - self.b_dec, self.W_enc.T)

    # ---- the model's units ------------------------------------------------------------

    def encode(self, x: Tensor, grad: Tensor | None = None, **options: Any) -> SparseCode:
        """Inference-mode code of raw activations [..., d_in] (flattened to [N, d_in]).

        grad: ∂CE/∂x for gradient_topk (without it, plain TopK); options: EncodeArgs fields
        such as mp_tol for adaptive matching pursuit. A rule whose per-token count varies
        comes back padded to the batch's longest row (`encode_scaled` keeps it ragged).
        """
        x = x.reshape(-1, self.d_in).to(self.W_dec.dtype) * self.input_scale
        if grad is not None:
            grad = grad.reshape(-1, self.d_in)
        return to_padded(self.encode_scaled(x, EncodeArgs(grad=grad, **options)).code)

    def decode(self, code: Code) -> Tensor:
        return self.decode_scaled(code) / self.input_scale

    def forward(self, x: Tensor, grad: Tensor | None = None) -> Tensor:
        shape = x.shape
        return self.decode(self.encode(x, grad)).reshape(shape).to(x.dtype)

    # ---- training helpers -----------------------------------------------------------

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        """Remove from W_dec's gradient its component along each (unit) row."""
        g = self.W_dec.grad
        if g is not None:
            g.sub_((g * self.W_dec).sum(1, keepdim=True) * self.W_dec)

    # ---- persistence ----------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        return {
            "arch": self.arch,
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "k": self.k,
            "input_scale": self.input_scale,
            "beta": self.beta,
        }

    def save(self, run: str | Path, extra: dict[str, Any] | None = None) -> None:
        """Write sae.safetensors, then cfg.json, each atomically."""
        run = Path(run)
        run.mkdir(parents=True, exist_ok=True)
        tensors = {n: t.detach().contiguous().cpu() for n, t in self.state_dict().items()}
        atomic_write(run / WEIGHTS, lambda p: save_file(tensors, str(p)))
        write_json(run / CFG, {**(extra or {}), **self.config()})

    @classmethod
    def load(cls, run: str | Path, device: str | torch.device = "cpu") -> SparseCoder:
        run = Path(run)
        cfg_path, w_path = run / CFG, run / WEIGHTS
        if not cfg_path.is_file() or not w_path.is_file():
            raise UserError(f"{run} holds no trained SAE ({CFG} and {WEIGHTS}); train one first")
        try:
            cfg = json.loads(cfg_path.read_text())
            sae = cls(
                cfg["d_in"],
                cfg["d_sae"],
                cfg["k"],
                cfg["arch"],
                cfg["input_scale"],
                device,
                beta=cfg.get("beta", 1.0),
            )
            sae.load_state_dict(load_file(w_path, device=str(device)))
        except (KeyError, json.JSONDecodeError, RuntimeError, OSError, SafetensorError) as e:
            raise UserError(f"{run} holds a damaged SAE ({type(e).__name__}); retrain it") from None
        return sae
