"""Model weights on disk and between layouts.

    checkpoint.py     the dit-moe checkpoint format: one self-describing folder (config.json + safetensors), atomic
    build.py          checkpoint -> model: the one ``fit(state, model)`` check and the one builder
    layouts.py        state-dict layouts: facebookresearch/DiT, diffusers' DiTTransformer2DModel, dit-moe
    outputs.py        the output folders convert, export and upcycle write (refusing to clobber), ConvertError
    convert.py        ``dit-moe convert``: published DiT weights in; out to diffusers (export.py) or the Hub (hub.py)
    export.py         a checkpoint out to diffusers: dense -> DiTPipeline, MoE -> DiTMoEPipeline (diffusers_moe.py)
    diffusers_moe.py  an MoE model as a diffusers ModelMixin and its DiffusionPipeline (DDPM / flow schedulers)
    hub.py            the Hub folder (config.json, model.safetensors, model card) and ``--push-to-hub``
    upcycle.py        ``dit-moe upcycle``: a dense checkpoint -> an MoE one
    init_from.py      ``train.init_from``: a run starts from another checkpoint's weights

Import the modules themselves (``from dit_moe.weights.checkpoint import load_checkpoint``); this file holds no code.
"""
