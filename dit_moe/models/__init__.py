"""Model code: the DiT backbone, MoE-MLP blocks and routers. Never imports training code."""
