"""Codec (HiFi-GAN style generator) ops on torch tensors: fused conv1d and conv_transpose1d.

Activations are [B, C, T]. Inputs need a dense time dimension only (batch/channel strides are free,
so slices of a streaming buffer work without copies); `out=` may be such a slice too. All ops
accumulate in float32. See docs/codec_ops.md for the exact formulas.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from ._lib import _C, dl, dl_opt, is_compiling, stream_of

__all__ = ["conv1d", "conv_transpose1d"]

Tensor = torch.Tensor
Padding = Union[int, Tuple[int, int], str]


def _time_dense(x: Tensor) -> Tensor:
    return x if (x.dim() != 3 or x.shape[-1] <= 1 or x.stride(-1) == 1) else x.contiguous()


def _pads(padding: Padding, k: int, dilation: int, op: str) -> Tuple[int, int]:
    if isinstance(padding, str):
        if padding != "same":
            raise ValueError(f"{op}: padding must be an int, a (left, right) pair or 'same', got {padding!r}")
        span = dilation * (k - 1)
        return span // 2, span - span // 2
    if isinstance(padding, (tuple, list)):
        if len(padding) != 2:
            raise ValueError(f"{op}: padding pair must be (left, right), got {padding!r}")
        return int(padding[0]), int(padding[1])
    return int(padding), int(padding)


def _shape_err(op: str, name: str, t) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 3:
        raise ValueError(f"{op}: {name} must be 3-D [batch, channels, time], got {tuple(t.shape)}")


def _conv1d(x, weight, bias, padding, dilation, lrelu_slope, residual, alpha, accum, beta, tanh, out):
    op = "conv1d"
    _shape_err(op, "x", x)
    if not isinstance(weight, Tensor) or weight.dim() != 3:
        raise ValueError(f"conv1d: weight must be 3-D [out_channels, in_channels, kernel], got {getattr(weight, 'shape', weight)}")
    pl, pr = _pads(padding, weight.shape[-1], int(dilation), op)
    if pl < 0 or pr < 0:
        raise ValueError(f"conv1d: padding must be >= 0, got ({pl}, {pr})")
    t_out = x.shape[-1] + pl + pr - int(dilation) * (weight.shape[-1] - 1)
    if t_out < 0:
        raise ValueError(f"conv1d: input of length {x.shape[-1]} is shorter than the dilated kernel with padding ({pl}, {pr})")
    x = _time_dense(x)
    out = _out_buffer(op, x, weight.shape[0], t_out, out)
    _C.conv1d(dl(x), dl(weight.contiguous()), dl_opt(bias), dl(out), dl_opt(residual), dl_opt(accum), pl, int(dilation),
              None if lrelu_slope is None else float(lrelu_slope), float(alpha), float(beta), bool(tanh), stream_of(x))
    return out


def _out_buffer(op, x, channels, t_out, out):
    """The output [batch, channels, t_out]: a new one like x, or the caller's after a shape check."""
    shape = (x.shape[0], channels, t_out)
    if out is None:
        return x.new_empty(*shape)
    if tuple(out.shape) != shape:
        raise ValueError(f"{op}: out must be {shape}, got {tuple(out.shape)}")
    return out


def _conv_transpose1d(x, weight, bias, stride, padding, output_padding, lrelu_slope, out):
    op = "conv_transpose1d"
    _shape_err(op, "x", x)
    if not isinstance(weight, Tensor) or weight.dim() != 3:
        raise ValueError(f"conv_transpose1d: weight must be 3-D [in_channels, out_channels, kernel], got {getattr(weight, 'shape', weight)}")
    if isinstance(padding, str):
        raise ValueError("conv_transpose1d: padding must be an int or a (left, right) pair")
    pl, pr = _pads(padding, weight.shape[-1], 1, op)
    if pl < 0 or pr < 0:
        raise ValueError(f"conv_transpose1d: padding must be >= 0, got ({pl}, {pr})")
    stride = int(stride)
    if stride < 1:
        raise ValueError(f"conv_transpose1d: stride must be >= 1, got {stride}")
    t_out = (x.shape[-1] - 1) * stride - pl - pr + weight.shape[-1] + int(output_padding)
    if t_out < 0:
        raise ValueError(f"conv_transpose1d: padding ({pl}, {pr}) crops more than the output length")
    x = _time_dense(x)
    out = _out_buffer(op, x, weight.shape[1], t_out, out)
    _C.conv_transpose1d(dl(x), dl(weight.contiguous()), dl_opt(bias), dl(out), stride, pl,
                        None if lrelu_slope is None else float(lrelu_slope), stream_of(x))
    return out


# ---- torch.library registration (used while compiling; no out=/aliasing there) --------------------

@torch.library.custom_op("vita::codec_conv1d", mutates_args=())
def _conv1d_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], pad_left: int, pad_right: int, dilation: int,
               lrelu_slope: Optional[float], residual: Optional[Tensor], alpha: float, accum: Optional[Tensor], beta: float,
               tanh: bool) -> Tensor:
    return _conv1d(x, weight, bias, (pad_left, pad_right), dilation, lrelu_slope, residual, alpha, accum, beta, tanh, None)


@_conv1d_op.register_fake
def _(x, weight, bias, pad_left, pad_right, dilation, lrelu_slope, residual, alpha, accum, beta, tanh):
    t = x.shape[-1] + pad_left + pad_right - dilation * (weight.shape[-1] - 1)
    return x.new_empty(x.shape[0], weight.shape[0], t)


@torch.library.custom_op("vita::codec_conv_transpose1d", mutates_args=())
def _convt_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: int, pad_left: int, pad_right: int,
              output_padding: int, lrelu_slope: Optional[float]) -> Tensor:
    return _conv_transpose1d(x, weight, bias, stride, (pad_left, pad_right), output_padding, lrelu_slope, None)


@_convt_op.register_fake
def _(x, weight, bias, stride, pad_left, pad_right, output_padding, lrelu_slope):
    t = (x.shape[-1] - 1) * stride - pad_left - pad_right + weight.shape[-1] + output_padding
    return x.new_empty(x.shape[0], weight.shape[1], t)


# ---- public API -------------------------------------------------------------------------------------

def conv1d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, padding: Padding = 0, dilation: int = 1,
           lrelu_slope: Optional[float] = None, residual: Optional[Tensor] = None, alpha: float = 1.0,
           accum: Optional[Tensor] = None, beta: float = 1.0, tanh: bool = False, out: Optional[Tensor] = None) -> Tensor:
    """Fused stride-1 1-D convolution, [B, Cin, T] -> [B, Cout, T'].

    out = post(alpha * (conv(act(x), weight) + bias + residual) + beta * accum)
      act = leaky_relu(., lrelu_slope) when lrelu_slope is not None; post = tanh when tanh=True.
    padding: int (both sides), (left, right) or "same" (left = span // 2, span = dilation*(K-1)).
    residual / accum: [B, Cout, T'] (optional); either may be `out` itself (in-place accumulate).
    out: optional destination (a [B, Cout, T'] tensor or a time-dense view, e.g. a buffer slice).
    """
    if is_compiling() and out is None:
        pl, pr = _pads(padding, weight.shape[-1], int(dilation), "conv1d")
        return _conv1d_op(x, weight, bias, pl, pr, int(dilation), lrelu_slope, residual, float(alpha), accum, float(beta), bool(tanh))
    return _conv1d(x, weight, bias, padding, dilation, lrelu_slope, residual, alpha, accum, beta if accum is not None else 0.0, tanh, out)


def conv_transpose1d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, stride: int = 1,
                     padding: Union[int, Tuple[int, int]] = 0, output_padding: int = 0, lrelu_slope: Optional[float] = None,
                     out: Optional[Tensor] = None) -> Tensor:
    """Fused transposed 1-D convolution (upsampling), weight [Cin, Cout, K] (torch layout).

    out = conv_transpose1d(act(x), weight, bias, stride, padding)   (as torch, with output_padding)
    padding: int or (left, right) cropped from the full output; T' = (T-1)*stride - left - right + K + output_padding.
    """
    if is_compiling() and out is None:
        pl, pr = _pads(padding, weight.shape[-1], 1, "conv_transpose1d")
        return _convt_op(x, weight, bias, int(stride), pl, pr, int(output_padding), lrelu_slope)
    return _conv_transpose1d(x, weight, bias, stride, padding, output_padding, lrelu_slope, out)
