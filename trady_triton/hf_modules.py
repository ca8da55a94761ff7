"""The converted forwards of Hugging Face modules (the classes are built in hf.py).

* Self-attention (BERT's ``BertSelfAttention``, ViT's ``ViTAttention``): q, k, v from
  the projections (converted like any Linear: frozen keeps nothing, selected its compact
  input), then :func:`~trady_triton.hf_attention.exact_attention`, which keeps q, k, v
  (in compressed mode, ``backward_bits`` set, as k-bit codes).
  Calls the adapter cannot serve exactly run HF's own forward and are then listed as not
  converted (``took_converted_path``): attention weights requested
  (``output_attentions``), a KV cache, causal (decoder) attention, an attention
  implementation other than ``sdpa`` / ``eager``.
* Feed-forward halves (``BertIntermediate``, ``ViTMLP``): the converted activation keeps
  the input of the first dense layer instead of its 4x wider output, and backward
  recomputes that output (:class:`~trady_triton.transformer.RecomputedActivation`).
"""

from __future__ import annotations

from torch import Tensor

from .activations import _SavedInputModule
from .hf_attention import exact_attention
from .transformer import RecomputedActivation, _grad_needed

_EXACT_IMPLEMENTATIONS = ("sdpa", "eager")


def _attention_weights_requested(kwargs) -> bool:
    """True when the caller asked for attention probabilities (HF's output capture)."""
    if kwargs.get("output_attentions"):
        return True
    try:   # transformers >= 5 collects them through a context variable
        from transformers.utils.output_capturing import _active_collector
    except ImportError:
        return False
    return "attentions" in (_active_collector.get() or {})


class ExactSelfAttention:
    """Mixin for HF self-attention: the shared setup, the path choice and the core."""

    # (query, key, value, output projection or None, head size, dropout) attribute names
    _names: tuple[str, str, str, str | None, str]
    backward_bits: int | None = None   # set by convert(): compressed mode

    def _trady_setup(self) -> None:
        self.took_converted_path = False

    def _dropout_p(self) -> float:
        raise NotImplementedError

    def _exact_path_applies(self, past_key_values, kwargs) -> bool:
        return (past_key_values is None and not getattr(self, "is_causal", False)
                and self._dropout_p() < 1.0
                and self.config._attn_implementation in _EXACT_IMPLEMENTATIONS
                and not _attention_weights_requested(kwargs))

    def _exact_forward(self, hidden_states: Tensor, attention_mask: Tensor | None):
        q_name, k_name, v_name, out_name, head_size = self._names
        hidden_shape = (*hidden_states.shape[:-1], -1, getattr(self, head_size))
        q, k, v = (getattr(self, n)(hidden_states).view(hidden_shape).transpose(1, 2)
                   for n in (q_name, k_name, v_name))
        p = self._dropout_p() if self.training else 0.0
        o = exact_attention(q, k, v, attention_mask, self.scaling, p, self.backward_bits)
        o = o.transpose(1, 2).reshape(*hidden_states.shape[:-1], -1)
        return (o if out_name is None else getattr(self, out_name)(o)), None


def bert_self_attention_forward(self, hidden_states, attention_mask=None, past_key_values=None,
                                **kwargs):
    self.took_converted_path = self._exact_path_applies(past_key_values, kwargs)
    if not self.took_converted_path:   # HF's own forward (the class after the mixin)
        return super(type(self), self).forward(hidden_states, attention_mask, past_key_values,
                                               **kwargs)
    return self._exact_forward(hidden_states, attention_mask)


def vit_attention_forward(self, hidden_states, attention_mask=None, **kwargs):
    self.took_converted_path = self._exact_path_applies(None, kwargs)
    if not self.took_converted_path:
        return super(type(self), self).forward(hidden_states, attention_mask, **kwargs)
    return self._exact_forward(hidden_states, attention_mask)


class RecomputingFeedForward:
    """Mixin for ``dense -> activation [-> dense]`` whose activation keeps dense's input."""

    # (first dense, activation, second dense or None) attribute names
    _names: tuple[str, str, str | None]

    def _trady_setup(self) -> None:
        pass

    def activation_name(self) -> str:
        return self._names[1]

    def first_dense_name(self) -> str:
        return self._names[0]

    def activation_kind(self) -> str | None:
        """The kind recomputed from the first dense's input, or None when the activation
        runs itself (not converted, or in compressed mode)."""
        act = getattr(self, self._names[1])
        if not isinstance(act, _SavedInputModule) or act.backward_bits is not None:
            return None
        return act.activation_kind()

    def forward(self, hidden_states: Tensor) -> Tensor:
        first, act_name, second = self._names
        dense = getattr(self, first)
        u = dense(hidden_states)
        kind = self.activation_kind()
        if kind is None or not _grad_needed(u):
            y = getattr(self, act_name)(u)
        else:
            y = RecomputedActivation.apply(u, hidden_states, dense.weight, dense.bias, kind)
        return y if second is None else getattr(self, second)(y)
