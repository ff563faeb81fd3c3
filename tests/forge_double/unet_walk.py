"""The pieces of a Forge/reForge-style UNet over the real ``ldm`` UNet's modules.

The ldm UNet has no ``transformer_options`` plumbing, so the doubles walk its blocks the way the hosts'
own UNets do:

- the UNet forwards themselves are in each double's host module (``forge2/backend/nn/unet.py``,
  ``reforge/ldm_patched/ldm/modules/diffusionmodules/openaimodel.py``), over these pieces;
- ``layer_forward`` mirrors one layer of ``TimestepEmbedSequential.forward`` / ``forward_timestep_embed``;
- ``spatial_transformer_forward`` mirrors ``SpatialTransformer.forward`` (sets ``["block_index"]``), called
  with the module's forward (pre-)hooks, as the host's ``layer(x, context, transformer_options)`` does;
- the host calls each transformer block as a module, ``block(x, context=context[i],
  transformer_options=transformer_options)`` (Forge ``backend/nn/unet.py`` and reForge ``attention.py``
  ``SpatialTransformer.forward``): ``rehome`` gives the ldm blocks a class whose ``forward`` takes
  ``transformer_options`` (``host_block_class``), so hooks and instance forwards on a block run as on the host;
- ``transformer_block_forward`` mirrors ``BasicTransformerBlock._forward``: ``extra_options`` =
  transformer_options minus patches plus ``n_heads``/``dim_head`` (reForge also ``attn_precision``),
  ``attn1_patch``, the attn1 replace lookup ``(block, id, block_index)`` then ``(block, id)`` with
  ``patch(to_q(n), to_k(ctx), to_v(val), extra_options)`` followed by ``to_out``, ``attn1_output_patch``,
  then attn2 (replace lookup likewise) and the feed-forward.

Not modelled: gligen's ``middle_patch``, reForge's ``forward_timestep_embed_patch`` and video layers. The
unpatched attn1 path calls the ldm module itself.
"""

import torch


CALLS = []  # rows of every UNet call (recorded by the doubles' apply_model), for tests


def layer_forward(layer, x, emb, context, to, attention, extra_keys, output_shape=None):
    """One layer of a ``TimestepEmbedSequential`` as both hosts dispatch it (Forge ``backend/nn/unet.py``
    ``TimestepEmbedSequential.forward``, reForge ``openaimodel.py`` ``forward_timestep_embed``), over ldm's
    (or the sgm double's) layer classes, told apart by class name: ResBlock ``(x, emb)``, SpatialTransformer
    ``(x, context, transformer_options)`` as a
    module call (its hooks run) then ``transformer_index += 1``, Upsample, anything else ``layer(x)``."""
    kinds = _kinds(layer)
    if "TimestepBlock" in kinds:
        return layer(x, emb)
    if "SpatialTransformer" in kinds:
        x = called_as_module(layer, spatial_transformer_forward, x, context, to, attention, extra_keys)
        if "transformer_index" in to:
            to["transformer_index"] += 1
        return x
    return layer(x)  # Upsample (ldm's doubles the size: the hosts' output_shape is that size here) and the rest


def _kinds(layer):
    """The class names of ``layer``'s type and bases: ldm's classes and the sgm double's (SDXL) alike."""
    return {cls.__name__ for cls in type(layer).__mro__}


_HOST_ATTENTION: list = []  # (attention, extra_keys) of the host whose spatial transformer is running


def _host_block_forward(self, x, context=None, transformer_options=None, **kwargs):
    """The host's ``BasicTransformerBlock.forward(x, context, transformer_options)``; without
    ``transformer_options`` (the ldm UNet's own forward, as the tests' reference calls it) the ldm block's."""
    if transformer_options is None:
        return self._ldm_forward(x, context, **kwargs)
    attention, extra_keys = _HOST_ATTENTION[-1]
    return transformer_block_forward(self, x, context, transformer_options, attention, extra_keys)


_BLOCK_CLASSES: dict = {}


def host_block_class(base):
    """A subclass of an ldm / sgm ``BasicTransformerBlock`` class whose forward is the host's (above)."""
    if base not in _BLOCK_CLASSES:
        _BLOCK_CLASSES[base] = type(f"Host{base.__name__}", (base,), {"forward": _host_block_forward,
                                                                      "_ldm_forward": base.forward})
    return _BLOCK_CLASSES[base]


def rehome(host_unet, ldm_unet, sequential):
    """Give ``host_unet`` the ldm UNet's modules, its blocks as ``sequential`` (the host's block class with
    the same children, so parameters are shared and attn1 paths stay ``input_blocks.4.1...``), and the
    transformer blocks the host's forward (``host_block_class``)."""
    for module in ldm_unet.modules():
        for i, tb in enumerate(getattr(module, "transformer_blocks", ())):
            if type(tb) not in _BLOCK_CLASSES.values():
                tb.__class__ = host_block_class(type(tb))
    host_unet.model_channels = ldm_unet.model_channels
    host_unet.num_classes = ldm_unet.num_classes
    host_unet.dtype = getattr(ldm_unet, "dtype", None)
    host_unet.time_embed = ldm_unet.time_embed
    if ldm_unet.num_classes is not None:
        host_unet.label_emb = ldm_unet.label_emb
    host_unet.input_blocks = torch.nn.ModuleList([sequential(*block) for block in ldm_unet.input_blocks])
    host_unet.middle_block = sequential(*ldm_unet.middle_block)
    host_unet.output_blocks = torch.nn.ModuleList([sequential(*block) for block in ldm_unet.output_blocks])
    host_unet.out = ldm_unet.out


def called_as_module(module, forward, x, context, to, *rest):
    """The host calls ``layer(x, context, transformer_options)``: torch's ``Module.__call__`` runs the
    module's pre-forward hooks on ``(x, context, transformer_options)`` and its forward hooks after."""
    args = (x, context, to)
    for hook in list(module._forward_pre_hooks.values()):
        changed = hook(module, args)
        if changed is not None:
            args = changed if isinstance(changed, tuple) else (changed,)
    out = forward(module, *args, *rest)
    for hook in list(module._forward_hooks.values()):
        changed = hook(module, args, out)
        if changed is not None:
            out = changed
    return out


def spatial_transformer_forward(st, x, context, to, attention, extra_keys):
    b, c, h, w = x.shape
    x_in = x
    x = st.norm(x)
    if not st.use_linear:
        x = st.proj_in(x)
    x = x.permute(0, 2, 3, 1).reshape(b, h * w, -1).contiguous()
    if st.use_linear:
        x = st.proj_in(x)
    _HOST_ATTENTION.append((attention, extra_keys))
    try:
        for i, block in enumerate(st.transformer_blocks):
            to["block_index"] = i
            x = block(x, context=context, transformer_options=to)  # a module call, as the host makes it
    finally:
        _HOST_ATTENTION.pop()
    if st.use_linear:
        x = st.proj_out(x)
    x = x.reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous()
    if not st.use_linear:
        x = st.proj_out(x)
    return x + x_in


def transformer_block_forward(tb, x, context, to, attention, extra_keys):
    extra_options = {}
    block = to.get("block", None)
    block_index = to.get("block_index", 0)
    patches, patches_replace = {}, {}
    for k in to:
        if k == "patches":
            patches = to[k]
        elif k == "patches_replace":
            patches_replace = to[k]
        else:
            extra_options[k] = to[k]
    extra_options["n_heads"] = tb.attn1.heads
    extra_options["dim_head"] = tb.attn1.to_q.out_features // tb.attn1.heads
    for k, v in (extra_keys or {}).items():
        extra_options[k] = v

    n = tb.norm1(x)
    context_attn1 = context if tb.disable_self_attn else None
    value_attn1 = None
    if "attn1_patch" in patches:
        if context_attn1 is None:
            context_attn1 = n
        value_attn1 = context_attn1
        for p in patches["attn1_patch"]:
            n, context_attn1, value_attn1 = p(n, context_attn1, value_attn1, extra_options)

    transformer_block = (block[0], block[1], block_index) if block is not None else None
    replace = patches_replace.get("attn1", {})
    key = transformer_block if transformer_block in replace else block
    if key in replace:
        if context_attn1 is None:
            context_attn1 = n
            value_attn1 = n
        q = tb.attn1.to_q(n)
        k = tb.attn1.to_k(context_attn1)
        v = tb.attn1.to_v(value_attn1)
        n = tb.attn1.to_out(replace[key](q, k, v, extra_options))
    elif value_attn1 is not None:
        q, k, v = tb.attn1.to_q(n), tb.attn1.to_k(context_attn1), tb.attn1.to_v(value_attn1)
        n = tb.attn1.to_out(attention(q, k, v, tb.attn1.heads, extra_options))
    else:
        n = tb.attn1(n, context=context_attn1)
    for p in patches.get("attn1_output_patch", []):
        n = p(n, extra_options)
    x = n + x

    n = tb.norm2(x)
    replace2 = patches_replace.get("attn2", {})
    key2 = transformer_block if transformer_block in replace2 else block
    if key2 in replace2:
        q, k, v = tb.attn2.to_q(n), tb.attn2.to_k(context), tb.attn2.to_v(context)
        n = tb.attn2.to_out(replace2[key2](q, k, v, extra_options))
    else:
        n = tb.attn2(n, context=context)
    for p in patches.get("attn2_output_patch", []):
        n = p(n, extra_options)
    x = n + x
    return tb.ff(tb.norm3(x)) + x


def sdpa_attention(q, k, v, heads):
    """Plain scaled-dot-product attention on ``(B, N, heads·d)`` projections (both hosts' default math)."""
    b, _, inner = q.shape
    d = inner // heads
    q, k, v = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(b, -1, heads * d)


def float_output(out):
    """The hosts' ``.float()`` on the UNet's output (fp16/bf16 up to fp32); float64 stays float64 here, as
    the tests compare paths in float64 (``tests/exactness.py``)."""
    return out if out.dtype == torch.float64 else out.float()


def apply_eps_model(diffusion_model, x, sigma, c_concat, c_crossattn, control, transformer_options, kwargs):
    """Both hosts' ``apply_model`` for an eps model (Forge 2 ``KModel.apply_model``, reForge
    ``BaseModel._apply_model``): ``calculate_input`` (``c_in``), the input, the context and every float extra
    cond in the UNet's dtype (fp16 UNets get fp16 inputs), the timestep as float, the output back to float
    (``float_output``), ``calculate_denoised``."""
    xc = c_in(sigma, x)
    if c_concat is not None:
        xc = torch.cat([xc, c_concat], dim=1)
    CALLS.append(xc.shape[0])
    dtype = next(diffusion_model.parameters()).dtype
    xc = xc.to(dtype)
    context = c_crossattn.to(dtype) if c_crossattn is not None else None
    extra = {k: (v.to(dtype) if torch.is_tensor(v) and v.dtype not in (torch.int, torch.long) else v)
             for k, v in kwargs.items()}
    eps = diffusion_model(xc, sigma_to_t(sigma).float(), context=context, control=control,
                          transformer_options=transformer_options, **extra)
    return denoised_from_eps(x, sigma, float_output(eps))


def denoised_from_eps(x, sigma, eps):
    """k-diffusion eps parameterisation: ``x0 = x − σ·ε``."""
    return x - eps * sigma.reshape(-1, *([1] * (x.ndim - 1)))


def c_in(sigma, x):
    return x / (sigma.reshape(-1, *([1] * (x.ndim - 1))) ** 2 + 1) ** 0.5


def sigma_to_t(sigma):
    """The double's timestep for a sigma (any fixed monotone map; the tests' reference uses this one)."""
    return sigma.float() * 100.0
