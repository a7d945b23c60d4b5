"""Hugging Face ``*ForCausalLM`` models, unchanged, behind tetrad's model interface.

Single-device PyTorch like every tetrad model. ``build_hf_model`` instantiates the
transformers class named by the config (on meta, under the trainer) and rehouses its modules:

- ``HFCausalLM`` (Llama, Mistral, Qwen2, Qwen3): the base model's own ``embed_tokens``,
  ``layers`` (as a ModuleDict "0".."n-1", so a pipeline stage can drop blocks and keep FQNs),
  ``norm``, ``rotary_emb`` and the ``lm_head``, with tetrad's loop over the HF decoder layers.
  Their attention layers call the run's ``AttentionFn`` (``set_attention``), registered with
  transformers' ``AttentionInterface`` as the "tetrad" implementation; the loop passes no mask
  (causal), and rotary positions come from the caller (pipeline stages, context-parallel
  chunks). FQNs are HF's without the ``model.`` prefix of the base model
  (``layers.0.self_attn.q_proj.weight``).
  Mixture-of-experts families (Qwen3-MoE, Mixtral) are driven alike, their sparse-MoE blocks
  swapped for tetrad's ``MoE`` layer (``tetrad.models.hf.moe``), and report routing
  (``auxiliary_loss``, ``expert_loads``) as tetrad's MoE families do.
- ``HFGenericCausalLM`` (any other ``*ForCausalLM``/``*LMHeadModel``): the base model and the
  output head under their HF names (``model``/``transformer``/…, ``lm_head``), run by
  transformers' own forward and its SDPA attention.

Both take token ids [B, T] and return logits [B, T, vocab].
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from tetrad.data.batch import document_positions
from tetrad.errors import ConfigError
from tetrad.models.attention import AttentionFn, causal_sdpa
from tetrad.models.dense import DenseDecoderShape, training_flops_per_token
from tetrad.models.hf.config import HFModelConfig, import_transformers
from tetrad.models.hf.moe import aux_loss_coef, routed_expert_params, swap_moe_blocks
from tetrad.models.moe import balance
from tetrad.models.moe.layer import GroupedExperts, MoE
from tetrad.models.spec import DecoderModel

ATTENTION_IMPLEMENTATION = "tetrad"
"""The name under which tetrad's attention is registered with transformers."""
_ATTENTION_ATTR = "tetrad_attention"
"""The attribute of each HF attention module holding the run's ``AttentionFn``."""


def _hf_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    document_ids: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature → the ``AttentionFn`` set on ``module``;
    ``document_ids`` come from tetrad's decoder loop, through the layer's keyword arguments."""
    if attention_mask is not None:
        raise RuntimeError("tetrad's decoder loop passes no attention mask; attention is causal")
    attention: AttentionFn = getattr(module, _ATTENTION_ATTR)
    out = attention(query, key, value, scale=scaling, dropout_p=dropout, document_ids=document_ids)
    return out.transpose(1, 2).contiguous(), None  # [B, T, H, head_dim], as HF's own return


class _HFBase(DecoderModel):
    """What both wrappers share: config, tying, initialisation by the HF class's own rules."""

    def __init__(self, config: HFModelConfig, hf_model: Any) -> None:
        super().__init__()
        self.config = config
        # The family's ``PreTrainedModel._init_weights(module)``: its init scheme (e.g. Gemma's
        # zero-centred norms) and its buffers (rotary tables, embedding scales). A plain
        # attribute: the method's model shares our modules and adds no state.
        self._hf_init_weights: Callable[[nn.Module], None] = hf_model._init_weights

    @abstractmethod
    def _embedding(self) -> nn.Module | None:
        """The token embedding (None on a later pipeline stage)."""

    @abstractmethod
    def _head(self) -> nn.Module | None:
        """The output projection (None on an earlier pipeline stage)."""

    def _tie(self) -> None:
        embed, head = self._embedding(), self._head()
        if self.config.tie_embeddings and embed is not None and head is not None:
            # to_empty unties shared parameters
            head.register_parameter("weight", embed.get_parameter("weight"))

    def _move_buffers(self, buffer_device: torch.device | None) -> None:
        """Put the non-persistent buffers on ``buffer_device`` (None: leave them where they
        are), e.g. the GPU while CPU offload keeps the parameters on the host."""
        if buffer_device is None:
            return
        for module in self.modules():
            for name in module._non_persistent_buffers_set:
                if (buffer := module._buffers.get(name)) is not None:
                    module._buffers[name] = buffer.to(buffer_device)

    @torch.no_grad()
    def init_buffers(self, buffer_device: torch.device | None = None) -> None:
        """Recompute the non-persistent buffers (garbage after ``to_empty``, in no checkpoint)
        on ``buffer_device`` (default: where they are) and re-tie the embeddings; parameters
        are left as they are (loaded weights)."""
        self._tie()
        for module in self.modules():
            if not module._non_persistent_buffers_set:
                continue
            # The HF init also draws the module's own weights: let it draw meta stand-ins
            # (no values, no RNG use, no collectives on sharded ones) and keep the real ones.
            params = dict(module._parameters)
            try:
                for name, param in params.items():
                    if param is not None:
                        stand_in = torch.empty(param.shape, dtype=param.dtype, device="meta")
                        module._parameters[name] = nn.Parameter(stand_in, requires_grad=False)
                self._hf_init_weights(module)
            finally:
                module._parameters.update(params)
        self._move_buffers(buffer_device)

    @torch.no_grad()
    def init_module_parameters(self, fqn: str, module: nn.Module) -> None:
        """Initialise the module's own parameters (full-size; possibly a stand-in, see
        ``tetrad.models.materialize``) by the HF class's rule for that module, from the
        global RNG."""
        self._hf_init_weights(module)


class HFCausalLM(_HFBase):
    """A Llama-like HF decoder driven by tetrad's loop and tetrad's attention. A pipeline stage may set
    ``embed_tokens``, ``norm`` and ``lm_head`` to None and delete entries of ``layers``; it then
    takes and/or returns hidden states [B, T, dim]."""

    embed_tokens: nn.Embedding | None
    norm: nn.Module | None
    lm_head: nn.Linear | None

    def __init__(self, config: HFModelConfig, hf_model: Any) -> None:
        super().__init__(config, hf_model)
        base = hf_model.model
        self.embed_tokens = base.embed_tokens
        self.layers = nn.ModuleDict({str(i): layer for i, layer in enumerate(base.layers)})
        self.norm = base.norm
        self.rotary_emb = base.rotary_emb
        self.lm_head = hf_model.lm_head
        self._tie()
        self.set_attention(causal_sdpa)

    def _embedding(self) -> nn.Module | None:
        return self.embed_tokens

    def _head(self) -> nn.Module | None:
        return self.lm_head

    def blocks(self) -> nn.ModuleDict:
        return self.layers

    def set_attention(self, attention: AttentionFn) -> None:
        for layer in self.layers.values():
            setattr(layer.get_submodule("self_attn"), _ATTENTION_ATTR, attention)

    def moe_layers(self) -> list[MoE]:
        return balance.moe_layers(self)

    def auxiliary_loss(self) -> torch.Tensor | None:
        coef = aux_loss_coef(self.config.hf_config) if self.config.moe else 0.0
        layers = self.moe_layers()  # all of them: HF mixtures take no pipeline stages
        return balance.auxiliary_loss(layers, coef, len(layers))

    def expert_loads(self) -> torch.Tensor | None:
        return balance.expert_loads(self.moe_layers())

    @torch.no_grad()
    def init_buffers(self, buffer_device: torch.device | None = None) -> None:
        """As for every HF model, and zero routing biases (garbage after ``to_empty``; HF
        checkpoints have none, a DCP checkpoint loaded afterwards brings its own)."""
        super().init_buffers(buffer_device)
        for layer in self.moe_layers():
            layer.router.expert_bias.zero_()

    @torch.no_grad()
    def init_module_parameters(self, fqn: str, module: nn.Module) -> None:
        """The HF class's rule; swapped experts by its rule for the experts it replaced
        (normal, std ``initializer_range``)."""
        if isinstance(module, GroupedExperts):
            for weight in (module.w1, module.w2, module.w3):
                weight.normal_(0.0, self.config.hf_config.initializer_range)
        else:
            super().init_module_parameters(fqn, module)

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens: [B, T] ids (or [B, T, dim] hidden states without embed_tokens).
        positions: [B, T] (or [T]) rotary positions; default 0..T-1, or each token's index in
        its document with ``document_ids`` [B, T] (packed documents, attending only within
        themselves). Returns logits [B, T, vocab] (or hidden states [B, T, dim] without
        lm_head)."""
        # Read T before embedding: under sequence parallel the embedding's output holds only
        # this rank's slice of the sequence, while attention sees all of it.
        if positions is None and document_ids is not None:
            positions = document_positions(document_ids)
        if positions is None:
            positions = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0)
        elif positions.dim() == 1:
            positions = positions.unsqueeze(0)
        h = self.embed_tokens(tokens) if self.embed_tokens is not None else tokens
        position_embeddings = self.rotary_emb(h, position_ids=positions)  # cos, sin [B, T, hd]
        for layer in self.layers.values():
            # No mask: tetrad's attention is causal (within documents, given document_ids).
            h = layer(
                h,
                attention_mask=None,
                position_embeddings=position_embeddings,
                document_ids=document_ids,
            )
        if self.norm is not None:
            h = self.norm(h)
        return self.lm_head(h) if self.lm_head is not None else h


class HFGenericCausalLM(_HFBase):
    """Any other HF causal LM, run by transformers' own forward (FSDP/HSDP/DDP, activation
    checkpointing and compile only). Its base model and output head keep their HF names
    (``model``, ``transformer``, ``gpt_neox``…; ``lm_head``), so FQNs are HF's keys."""

    def __init__(self, config: HFModelConfig, hf_model: Any) -> None:
        super().__init__(config, hf_model)
        base, head = hf_model.base_model, hf_model.get_output_embeddings()
        self._base_name = hf_model.base_model_prefix
        self._head_name = next(name for name, child in hf_model.named_children() if child is head)
        self.add_module(self._base_name, base)
        self.add_module(self._head_name, head)
        # The decoder layers: the one ModuleList of num_hidden_layers blocks in the base model.
        self._layers_name = next(
            (
                name
                for name, child in base.named_modules()
                if isinstance(child, nn.ModuleList) and len(child) == config.n_layers
            ),
            None,
        )
        if self._layers_name is None:
            raise ConfigError(
                f"{config.architecture}: no list of {config.n_layers} decoder layers found; "
                "tetrad cannot shard it per layer"
            )
        self._tie()

    @property
    def base(self) -> Any:
        return self._modules[self._base_name]

    @property
    def embed_tokens(self) -> nn.Module:
        embedding: nn.Module = self.base.get_input_embeddings()
        return embedding

    def _embedding(self) -> nn.Module:
        return self.embed_tokens

    def _head(self) -> nn.Module:
        return self.get_submodule(self._head_name)

    def blocks(self) -> nn.ModuleList:
        """The decoder layers, for activation checkpointing, compile and FSDP."""
        layers = self.base.get_submodule(self._layers_name)
        assert isinstance(layers, nn.ModuleList)
        return layers

    def set_attention(self, attention: AttentionFn) -> None:
        """transformers' forward runs its own SDPA attention, which is plain causal attention:
        any other (context parallel's) needs a family tetrad runs layer by layer."""
        if attention is not causal_sdpa:
            raise ConfigError(
                f"{self.config.architecture} runs transformers' own attention; "
                f"{getattr(attention, '__qualname__', attention)} needs a Llama-like family"
            )

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if document_ids is not None:
            raise ConfigError(
                f"{self.config.architecture} runs transformers' own attention, which cannot "
                "keep packed documents apart; use a Llama-like family or --data.document_mask=false"
            )
        out = self.base(input_ids=tokens, position_ids=positions, use_cache=False)
        return self._head()(out.last_hidden_state)


def build_hf_model(config: HFModelConfig) -> DecoderModel:
    """Instantiate the config's ``*ForCausalLM`` (under the caller's device context, meta in
    the trainer) and wrap it; a native family's attention layers call tetrad's attention."""
    transformers = import_transformers()
    if config.native:
        transformers.AttentionInterface.register(ATTENTION_IMPLEMENTATION, _hf_attention)
        config.hf_config._attn_implementation = ATTENTION_IMPLEMENTATION
    cls: Any = getattr(transformers, config.architecture)
    hf_model = cls(config.hf_config)
    if config.moe:
        swap_moe_blocks(hf_model)
    wrapper = HFCausalLM if config.native else HFGenericCausalLM
    return wrapper(config, hf_model)


def dense_shape(config: HFModelConfig) -> DenseDecoderShape:
    """A Llama-like decoder's shape (gated MLP, RMSNorm), with q/k/v biases as in Qwen2 and
    per-head q/k norms as in Qwen3."""
    c, dim, hd = config.hf_config, config.dim, config.head_dim
    q_dim, kv_dim = config.n_heads * hd, config.kv_heads * hd
    attention_extra = 0
    if c.model_type == "qwen2":
        attention_extra += q_dim + 2 * kv_dim  # q/k/v biases; o_proj has none
    elif getattr(c, "attention_bias", False):
        attention_extra += q_dim + 2 * kv_dim + dim
    if c.model_type == "qwen3":
        attention_extra += 2 * hd  # q_norm, k_norm
    mlp_bias = getattr(c, "mlp_bias", False)
    return DenseDecoderShape(
        dim=dim,
        n_layers=config.n_layers,
        n_heads=config.n_heads,
        kv_heads=config.kv_heads,
        head_dim=hd,
        hidden_dim=config.hidden_dim,
        vocab_size=config.vocab_size,
        tie_embeddings=config.tie_embeddings,
        attention_extra=attention_extra,
        mlp_extra=2 * config.hidden_dim + dim if mlp_bias else 0,
    )


def count_params(config: HFModelConfig) -> dict[str, int]:
    """Parameter counts of a native family by top-level module, plus "total"; of a MoE family
    "total" and "active" (those one token goes through: its k routed experts per layer)."""
    if not config.moe:
        return dense_shape(config).count_params(("embed_tokens", "layers", "norm", "lm_head"))
    with torch.device("meta"):
        model = build_hf_model(config)
    total = sum(p.numel() for p in model.parameters())  # a tied weight once
    experts, active_experts = routed_expert_params(model)
    return {"total": total, "active": total - experts + active_experts}


def num_flops_per_token(config: HFModelConfig, seq_len: int) -> int:
    """Training FLOPs per token, as for llama3 (``training_flops_per_token``), over the active
    parameters of a mixture of experts."""
    if config.native and not config.moe:
        return dense_shape(config).flops_per_token(seq_len)
    if config.moe:
        n = count_params(config)["active"]
    else:  # no formula for every architecture: count a meta build's parameters instead
        with torch.device("meta"):
            n = sum(p.numel() for p in build_hf_model(config).parameters())
    n -= config.vocab_size * config.dim
    n += config.vocab_size * config.dim if config.tie_embeddings else 0  # the output matmul
    return training_flops_per_token(n, config.n_layers, config.n_heads * config.head_dim, seq_len)
