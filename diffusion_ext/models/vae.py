"""VAE: the convolutional variational autoencoder of the latent-diffusion task (Kingma & Welling 2014;
the first stage of Rombach et al. 2022), 64×64×3 images <-> 8×8×4 latents with channel_mults=(1, 2, 4)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._config import divisible_by_groups, int_list, positive_int
from .blocks import VAEResBlock

# log σ² is clamped to this range before exp: an untrained or diverging encoder cannot overflow exp or
# make the KL infinite (as Rombach et al.'s DiagonalGaussianDistribution does).
LOGVAR_RANGE = (-30.0, 20.0)


class VAE(torch.nn.Module):
    """Encoder: conv_in, then per level a VAEResBlock ((conv, GroupNorm, ReLU) ×2 with a skip) followed by
    a stride-2 convolution, then a convolution to 2·latent_channels maps: μ and log σ². The decoder mirrors
    it: conv_in, per level (reversed) a stride-2 transposed convolution and a VAEResBlock, then a
    convolution to in_channels and tanh, so x̂ lies in (−1, 1) like the data.

    fused=True builds GroupNormAct(activation="relu") with the diffusion_ext kernel, fused=False eager
    PyTorch, with the same state_dict. `config` rebuilds the model: `VAE(**m.config, fused=...)`.
    """

    def __init__(self, in_channels: int = 3, latent_channels: int = 4, base_channels: int = 64,
                 channel_mults=(1, 2, 4), num_groups: int = 32, fused: bool = True):
        super().__init__()
        c = "VAE"
        for name, v in (("in_channels", in_channels), ("latent_channels", latent_channels),
                        ("base_channels", base_channels), ("num_groups", num_groups)):
            positive_int(c, name, v)
        mults = int_list(c, "channel_mults", channel_mults)
        divisible_by_groups(c, "base_channels", base_channels, num_groups)  # the decoder's last block is this wide
        for i, m in enumerate(mults):
            divisible_by_groups(c, f"base_channels × channel_mults[{i}]", base_channels * m, num_groups)
        self.config = dict(in_channels=in_channels, latent_channels=latent_channels, base_channels=base_channels,
                           channel_mults=mults, num_groups=num_groups)
        self.in_channels, self.latent_channels, self.fused = in_channels, latent_channels, fused
        self.downsample_factor = 2 ** len(mults)
        widths = [base_channels * m for m in mults]
        G = num_groups

        # encoder
        self.enc_conv_in = torch.nn.Conv2d(in_channels, base_channels, 3, padding=1)
        self.enc_blocks = torch.nn.ModuleList()
        self.enc_down = torch.nn.ModuleList()
        cur = base_channels
        for w in widths:
            self.enc_blocks.append(VAEResBlock(cur, w, G, fused))
            self.enc_down.append(torch.nn.Conv2d(w, w, 4, stride=2, padding=1))
            cur = w
        self.enc_conv_out = torch.nn.Conv2d(cur, 2 * latent_channels, 3, padding=1)

        # decoder: the encoder's levels in reverse; level i maps widths[i] -> widths[i − 1] (base at i = 0)
        self.dec_conv_in = torch.nn.Conv2d(latent_channels, cur, 3, padding=1)
        self.dec_up = torch.nn.ModuleList()
        self.dec_blocks = torch.nn.ModuleList()
        for i in reversed(range(len(widths))):
            nxt = widths[i - 1] if i else base_channels
            self.dec_up.append(torch.nn.ConvTranspose2d(cur, cur, 4, stride=2, padding=1))
            self.dec_blocks.append(VAEResBlock(cur, nxt, G, fused))
            cur = nxt
        self.dec_conv_out = torch.nn.Conv2d(cur, in_channels, 3, padding=1)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, in_channels, H, W) -> (μ, log σ²), each (B, latent_channels, H/2^L, W/2^L)."""
        f = self.downsample_factor
        if x.dim() != 4 or x.shape[1] != self.in_channels or x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"VAE.encode: x must be (B, in_channels={self.in_channels}, H, W) with H and W "
                             f"divisible by {f}, got {tuple(x.shape)}")
        # 1. conv_in, then per level: residual block, stride-2 convolution (H, W halve)
        h = self.enc_conv_in(x)
        for block, down in zip(self.enc_blocks, self.enc_down):
            h = down(block(h))
        # 2. q(z|x) = N(μ, diag σ²): the two halves of the last convolution (Kingma & Welling 2014, §3)
        mu, logvar = self.enc_conv_out(h).chunk(2, dim=1)
        return mu, logvar.clamp(*LOGVAR_RANGE)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, latent_channels, h, w) -> x̂ (B, in_channels, h·2^L, w·2^L) in (−1, 1)."""
        if z.dim() != 4 or z.shape[1] != self.latent_channels:
            raise ValueError(f"VAE.decode: z must be (B, latent_channels={self.latent_channels}, h, w), "
                             f"got {tuple(z.shape)}")
        # 1. conv_in, then per level: stride-2 transposed convolution (H, W double), residual block
        h = self.dec_conv_in(z)
        for up, block in zip(self.dec_up, self.dec_blocks):
            h = block(up(h))
        # 2. x̂ = tanh(conv_out(h))
        return torch.tanh(self.dec_conv_out(h))

    @staticmethod
    def reparameterize(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """z = μ + σ·ε, ε ~ N(0, I) from torch's generator (Kingma & Welling 2014, eq. 10)."""
        return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)

    def forward(self, x: torch.Tensor, sample: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x̂, μ, log σ²); z is sampled (reparameterised) when sample, else z = μ."""
        mu, logvar = self.encode(x)
        z = self.reparameterize(mu, logvar) if sample else mu
        return self.decode(z), mu, logvar

    def loss(self, x: torch.Tensor, beta: float = 1e-3) -> tuple[torch.Tensor, dict[str, float]]:
        """The β-VAE objective (Higgins et al. 2017): recon + β·KL, both means per element, so β does not
        depend on the image size:
        recon = mean (x̂ − x)², KL = mean over latent elements of ½(μ² + σ² − log σ² − 1), the closed form
        of KL(N(μ, σ²) ‖ N(0, 1)) (Kingma & Welling 2014, App. B)."""
        x_hat, mu, logvar = self(x, sample=True)
        recon = F.mse_loss(x_hat.float(), x.float())
        mu, logvar = mu.float(), logvar.float()
        kl = 0.5 * (mu.square() + logvar.exp() - logvar - 1).mean()
        loss = recon + beta * kl
        return loss, {"recon": recon.item(), "kl": kl.item()}
