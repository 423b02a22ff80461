"""LearnedKVSplice: a low-rank code of the MLA latent that is stored in the KV cache instead of it.

MLA caches, per token and layer, the latent `c` (kv_lora_rank wide, 512 on DeepSeek-V2) and the
RoPE key `k_pe`. A splice stores `z = encode(c)` (r wide) instead of `c` and reads it back with the
affine map `c_hat = W_e z + b_e`. Because the read path is affine, it folds into the up-projection
`kv_b_proj` (W -> W W_e, bias W b_e), so attention runs directly on the r-wide code and no expand
step happens at run time (see `fold_into_kv_b_proj`).
"""
from __future__ import annotations

import torch
from torch import nn

INITS = ("truncate", "orthogonal", "pca")


def rank_for_ratio(latent_dim: int, compression_ratio: float) -> int:
    """Number of latent dims kept: round(ratio * latent_dim), at least 1."""
    if not 0.0 < compression_ratio <= 1.0:
        raise ValueError(f"compression_ratio must be in (0, 1], got {compression_ratio}")
    return max(1, round(compression_ratio * latent_dim))


class LearnedKVSplice(nn.Module):
    """Encode a latent into an r-wide code and decode it back with an affine (foldable) map.

    encode: optional per-dim affine transform (a learnable scale/shift), linear projection to r dims
    (with a bias so a centred PCA code fits), optional LayerNorm on the code.
    decode: `expand(z) = W_e z + b_e`, affine so it can be folded into `kv_b_proj`.

    The LayerNorm is off by default: it divides every token's code by that token's own spread, a
    per-token scale the affine decode cannot restore, so neither `truncate` nor `pca` reconstructs
    the latent with it on (so it is not the identity at initialisation either).
    """

    def __init__(
        self,
        latent_dim: int,
        compression_ratio: float = 0.5,
        use_layernorm: bool = False,
        use_transform: bool = False,
    ) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.compression_ratio = compression_ratio
        self.rank = rank_for_ratio(latent_dim, compression_ratio)
        self.use_layernorm = use_layernorm
        self.use_transform = use_transform
        self.init_method = "truncate"
        if use_transform:
            self.transform_scale = nn.Parameter(torch.ones(latent_dim))
            self.transform_shift = nn.Parameter(torch.zeros(latent_dim))
        self.compress = nn.Linear(latent_dim, self.rank, bias=True)
        self.code_norm = nn.LayerNorm(self.rank) if use_layernorm else None
        self.expand = nn.Linear(self.rank, latent_dim, bias=True)
        self.init_truncate()

    # -- the two maps ---------------------------------------------------------------------------

    def encode(self, latent: torch.Tensor) -> torch.Tensor:
        """[..., latent_dim] -> [..., rank]; computed in the splice's dtype, returned in the input's."""
        x = latent.to(self.compress.weight.dtype)
        if self.use_transform:
            x = x * self.transform_scale + self.transform_shift
        z = self.compress(x)
        if self.code_norm is not None:
            z = self.code_norm(z)
        return z.to(latent.dtype)

    def decode(self, code: torch.Tensor) -> torch.Tensor:
        """[..., rank] -> [..., latent_dim]: the affine read path."""
        return self.expand(code.to(self.expand.weight.dtype)).to(code.dtype)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        """Round trip, what attention sees: decode(encode(latent))."""
        return self.decode(self.encode(latent))

    # -- initialisations --------------------------------------------------------------------------

    @torch.no_grad()
    def init_truncate(self) -> None:
        """Keep the first r latent coordinates, drop the rest (data-free; the original plug-in's init)."""
        basis = torch.eye(self.latent_dim)[: self.rank].T  # [latent_dim, rank]
        self._set_basis(basis, mean=torch.zeros(self.latent_dim))
        self.init_method = "truncate"

    @torch.no_grad()
    def init_orthogonal(self, seed: int = 0) -> None:
        """A random orthonormal r-dim subspace (a data-free baseline)."""
        gen = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(self.latent_dim, self.rank, generator=gen, dtype=torch.float64))
        self._set_basis(q.float(), mean=torch.zeros(self.latent_dim))
        self.init_method = "orthogonal"

    @torch.no_grad()
    def init_pca(self, latents: torch.Tensor) -> None:
        """Principal components of calibration latents [n, latent_dim]: the best rank-r linear code
        for reconstruction (squared error) of data distributed like them."""
        x = latents.reshape(-1, self.latent_dim).double()
        if x.shape[0] < 2:
            raise ValueError("PCA initialisation needs at least 2 calibration latents")
        mean = x.mean(dim=0)
        cov = (x - mean).T @ (x - mean) / (x.shape[0] - 1)
        eigvals, eigvecs = torch.linalg.eigh(cov)  # ascending
        basis = eigvecs[:, eigvals.argsort(descending=True)[: self.rank]]
        self._set_basis(basis.float(), mean=mean.float())
        self.init_method = "pca"

    def _set_basis(self, basis: torch.Tensor, mean: torch.Tensor) -> None:
        """Code = basis^T (c - mean), read back as basis z + mean (an orthogonal projection)."""
        dtype = self.compress.weight.dtype
        self.compress.weight.copy_(basis.T.to(dtype))
        self.compress.bias.copy_((-basis.T @ mean).to(dtype))
        self.expand.weight.copy_(basis.to(dtype))
        self.expand.bias.copy_(mean.to(dtype))
        if self.use_transform:
            self.transform_scale.fill_(1.0)
            self.transform_shift.zero_()
        if self.code_norm is not None:
            self.code_norm.reset_parameters()

    # -- folding ------------------------------------------------------------------------------------

    @torch.no_grad()
    def fold_into_kv_b_proj(self, kv_b_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fold the decode into the up-projection: kv_b(W_e z + b_e) = (W W_e) z + W b_e.

        Returns (weight [out, rank], bias [out]) in kv_b_weight's dtype. In attention the key part of
        the bias shifts every score of a query by the same amount and drops out of the softmax; the
        value part adds a constant to each head's output.
        """
        w = kv_b_weight.float()
        weight = w @ self.expand.weight.float()
        bias = w @ self.expand.bias.float()
        return weight.to(kv_b_weight.dtype), bias.to(kv_b_weight.dtype)

    def extra_repr(self) -> str:
        return (
            f"latent_dim={self.latent_dim}, rank={self.rank}, init={self.init_method}, "
            f"layernorm={self.use_layernorm}, transform={self.use_transform}"
        )
