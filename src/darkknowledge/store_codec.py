"""The compact layout of a sampled row: an exact head and K draws packed into a few dozen bytes.

A sampled row (:func:`darkknowledge.losses.sampled_targets`) is the h most probable tokens at their probabilities
and K tokens drawn with replacement from the rest, each draw weighing ``P / K`` (P the rest's mass). Kept as
float16 log-frequencies and 16-bit ids plus two float32 (the empty tail) it takes ``4 (h + K) + 8`` bytes; the
same information fits in far fewer, as one row of bytes:

- the ``h + K`` ids, head first then the K draws WITH repetition (a token drawn twice is written twice, so no
  counts are kept), each in ``ceil(log2 V)`` bits, little-endian bit order, padded to whole bytes;
- the head's probabilities as one byte each: ``log p`` relative to the row's most probable token,
  ``q = round(-(log p - log p_max) / STEP)`` clipped to 0..255 (``quant="log8"``: STEP = 1/16 nat, so a ratio
  is kept within 1/32 nat, ~3%, over 0..15.94 nats; a token more than 15.94 nats below the row's maximum,
  ``p < 1.2e-7 p_max``, is kept at that bound), or ``-(log p - log p_max)`` as a float8 e4m3 number
  (``quant="e4m3"``: 3 mantissa bits, so finer than log8 within 1 nat of the maximum and coarser below 2 nats);
- P as a 16-bit fraction, ``round(P * 65535)`` (within 7.7e-6).

The head's absolute probabilities come back from P: ``p_max = (1 - P) / sum_i exp(-q_i STEP)``, so a decoded row
sums to one and only the ratios within the head carry the 8-bit error. At V = 4,096 (12-bit ids): h = 16, K = 16
is 48 + 16 + 2 = 66 bytes; h = 12, K = 21 is 64; h = 6, K = 10 is 32.

Measured (a 6-epoch ``gpt:layers=2,dim=96`` Shakespeare model, V = 4,096, 5,120 positions; mean KL of the
unquantised sampled row to the decoded one): log8 2e-5 to 4e-5 nats over the five layouts of the ``compact``
plan, e4m3 6e-5 to 3.3e-4; e4m3 of the absolute p with P taken as ``1 - sum(head)`` instead of stored (2 bytes
saved) 2e-3 to 5e-3, 50 to 120 times log8's: so P is stored and the head kept relative to its maximum.

Encoding and decoding are vectorised over rows (numpy bit packing; unpacking by torch shifts and masks, so rows
kept on a GPU decode there), no loop over rows; a batch decodes only its rows. :meth:`CompactCodec.decode` gives
:class:`darkknowledge.losses.TopKTargets` in exactly the convention of ``sampled_targets`` (through
:func:`darkknowledge.losses.sample_targets`), so the loss reads compact rows as it reads sampled ones.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .errors import DarkKnowledgeError
from .losses import TopKTargets, sample_targets

QUANTS = ("log8", "e4m3")
STEP = 1 / 16  # nats between two log8 codes
MASS_SCALE = 65535  # P as a 16-bit fraction


@dataclass(frozen=True)
class CompactCodec:
    """Packs sampled rows of ``head + samples`` columns over a vocabulary of ``vocab_size`` into
    :attr:`bytes_per_row` bytes each, and back."""

    vocab_size: int
    head: int
    samples: int
    quant: str = "log8"

    def __post_init__(self):
        for name in ("vocab_size", "samples", "head"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "head" else 1):
                raise DarkKnowledgeError(f"a compact store's {name} must be an integer >= "
                                         f"{0 if name == 'head' else 1}, got {value!r}")
        if self.head + self.samples > self.vocab_size:
            raise DarkKnowledgeError(f"a compact store's head + samples must be at most the vocabulary "
                                     f"({self.vocab_size}), got {self.head} + {self.samples}")
        if self.quant not in QUANTS:
            raise DarkKnowledgeError(f"a compact store's quantisation must be one of {', '.join(QUANTS)}, "
                                     f"got {self.quant!r}")

    @property
    def id_bits(self) -> int:
        """Bits of one token id: ``ceil(log2 V)`` (at least 1)."""
        return max(1, math.ceil(math.log2(self.vocab_size)))

    @property
    def _id_bytes(self) -> int:
        return math.ceil((self.head + self.samples) * self.id_bits / 8)

    @property
    def bytes_per_row(self) -> int:
        """Bytes of one row: the packed ids, a byte per head probability, two bytes of P."""
        return self._id_bytes + self.head + 2

    # -- encoding ------------------------------------------------------------------------------------------------

    def encode(self, t: TopKTargets) -> np.ndarray:
        """uint8 ``[n, bytes_per_row]`` of rows ``[n, h + K]`` as ``sampled_targets`` (or :meth:`decode`) makes
        them: the head in the first h columns, then the distinct tokens drawn at ``P count / K``."""
        logits = t.logits.detach().float().cpu()
        ids = t.indices.detach().cpu().long()
        if logits.dim() != 2 or logits.shape[-1] != self.head + self.samples:
            raise DarkKnowledgeError(f"a compact codec of head {self.head} + samples {self.samples} encodes rows "
                                     f"[n, {self.head + self.samples}], got {tuple(logits.shape)}")
        h, k = self.head, self.samples
        head_p = logits[:, :h].exp()
        drawn_p = torch.where(logits[:, h:] > torch.finfo(torch.float16).min, logits[:, h:].exp(), 0.0)
        mass = drawn_p.sum(-1)
        counts = torch.round(drawn_p / mass.clamp_min(1e-38).unsqueeze(-1) * k).long()
        # a head holding all the mass (P = 0): its draws weigh nothing, any k tokens outside the head do
        counts[mass == 0] = 0
        counts[mass == 0, 0] = k
        if not bool((counts.sum(-1) == k).all()):
            raise DarkKnowledgeError(f"rows to encode are not {k} draws (their frequencies are not multiples of "
                                     f"P / {k}): encode rows made by sampled_targets with samples={k}")
        picks = np.repeat(ids[:, h:].numpy().reshape(-1), counts.numpy().reshape(-1)).reshape(-1, k)
        return self.pack(head_p.numpy(), ids[:, :h].numpy(), picks, mass.numpy())

    def pack(self, head_p: np.ndarray, head_ids: np.ndarray, picks: np.ndarray, mass: np.ndarray) -> np.ndarray:
        """uint8 ``[n, bytes_per_row]`` of the parts of rows: head probabilities and ids ``[n, h]`` (most probable
        first), draws ``[n, K]`` and the rest's mass P ``[n]``."""
        n = len(mass)
        ids = np.concatenate([head_ids, picks], -1).astype(np.uint32)
        bits = (ids[..., None] >> np.arange(self.id_bits, dtype=np.uint32)) & 1
        packed = np.packbits(bits.astype(np.uint8).reshape(n, -1), axis=-1, bitorder="little")
        with np.errstate(divide="ignore"):
            below_max = -(np.log(head_p) - np.log(head_p[:, :1])) if self.head else np.zeros((n, 0))
        below_max = np.nan_to_num(below_max, nan=np.inf, posinf=np.inf)  # p = 0 lies below every code
        if self.quant == "log8":
            codes = np.clip(np.round(below_max / STEP), 0, 255).astype(np.uint8)
        else:
            codes = torch.from_numpy(np.minimum(below_max, 448.0).astype(np.float32)).to(
                torch.float8_e4m3fn).view(torch.uint8).numpy()
        p = np.round(np.clip(mass, 0, 1) * MASS_SCALE).astype("<u2").view(np.uint8).reshape(n, 2)
        return np.concatenate([packed, codes, p], -1)

    # -- decoding ------------------------------------------------------------------------------------------------

    def unpack(self, rows: np.ndarray | Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(head probabilities ``[n, h]``, head ids ``[n, h]``, draws ``[n, K]``, P ``[n]``) of rows
        ``[n, bytes_per_row]`` (a numpy array, or a uint8 tensor on any device: the parts come back on its
        device, so a store's rows kept on a GPU are decoded there): the inverse of :meth:`pack`, up to the
        quantisation. The same bits on every device: ids and P are integer and exactly rounded float32 work, and
        a head code's ratio to the maximum is looked up in a table made once on the host."""
        if isinstance(rows, np.ndarray):  # copied only where not already writable contiguous bytes (a memmap)
            rows = torch.from_numpy(np.require(rows, np.uint8, ["C", "W"]))
        if rows.dtype != torch.uint8:
            raise DarkKnowledgeError(f"compact rows are uint8 bytes, got {rows.dtype}: decode the store's rows")
        rows = rows.reshape(-1, self.bytes_per_row)
        h, b = self.head, self.id_bits
        # id j's bits start at bit j b: gather the bytes they span as one little-endian integer, shift and mask
        start = torch.arange(h + self.samples, device=rows.device) * b
        word = torch.zeros(len(rows), h + self.samples, dtype=torch.int64, device=rows.device)
        for k in range((b + 14) // 8):  # bytes an id spans at a shift of up to 7 bits
            byte = (start // 8 + k).clamp_max(self._id_bytes - 1)  # bytes past the ids only feed masked bits
            word |= rows.index_select(1, byte).long() << (8 * k)
        ids = (word >> (start % 8)) & ((1 << b) - 1)
        ratios = _ratio_table(self.quant).to(rows.device)[rows[:, self._id_bytes:self._id_bytes + h].long()]
        mass = (rows[:, -2].long() | rows[:, -1].long() << 8).float() / MASS_SCALE
        head_p = ratios * ((1 - mass) / _row_sum(ratios).clamp_min(1e-38))[:, None] if h else ratios
        return head_p, ids[:, :h], ids[:, h:], mass

    def decode(self, rows: np.ndarray | Tensor) -> TopKTargets:
        """Rows ``[n, bytes_per_row]`` (numpy, or a uint8 tensor on any device, decoded there) as the targets
        ``[n, h + K]`` of ``sampled_targets``: log-probabilities as logits (finite), an empty tail
        (``tail_logsumexp`` -inf, ``tail_mean`` 0)."""
        head_p, head_ids, picks, mass = self.unpack(rows)
        return sample_targets(head_p, head_ids, picks, mass, self.vocab_size)

    def valid(self, rows: np.ndarray) -> np.ndarray:
        """Whether each row can be one this codec wrote (bool ``[n]``): ids within the vocabulary, the head's
        distinct, no draw in the head, P = 1 without a head. An unwritten (zero) row is never valid."""
        _, head_ids, picks, mass = self.unpack(rows)
        ids = torch.cat([head_ids, picks], -1)
        ok = (ids < self.vocab_size).all(-1)
        if self.head:  # each head id once among all the row's ids
            ok &= ((head_ids[:, :, None] == ids[:, None, :]).sum(-1) == 1).all(-1)
        else:
            ok &= mass == 1
        return ok.cpu().numpy()


@functools.cache
def _ratio_table(quant: str) -> Tensor:
    """``exp(-below_max)`` of each of the 256 head codes (float32, numpy's exp, as the codec has always used)."""
    codes = np.arange(256, dtype=np.uint8)
    if quant == "log8":
        below_max = codes.astype(np.float32) * STEP
    else:
        below_max = torch.from_numpy(codes).view(torch.float8_e4m3fn).float().numpy()
    with np.errstate(over="ignore"):  # a negative e4m3 code (never written) is an infinite ratio, as before
        return torch.from_numpy(np.exp(-below_max))


def _row_sum(x: Tensor) -> Tensor:
    """Sums of the rows of ``x`` in numpy's pairwise order (up to 8 columns one by one; else 8 strided partial
    sums added pairwise, then the rest one by one; halves past 128), so that a row decodes to the same bits on
    any device as it did when the codec summed with numpy."""
    n = x.shape[-1]
    if n > 128:
        half = n // 2 - n // 2 % 8
        return _row_sum(x[:, :half]) + _row_sum(x[:, half:])
    if n < 8:
        total = torch.zeros(len(x), dtype=x.dtype, device=x.device)
        for j in range(n):
            total = total + x[:, j]
        return total
    r = x[:, :8].clone()
    for i in range(8, n - n % 8, 8):
        r += x[:, i:i + 8]
    total = ((r[:, 0] + r[:, 1]) + (r[:, 2] + r[:, 3])) + ((r[:, 4] + r[:, 5]) + (r[:, 6] + r[:, 7]))
    for j in range(n - n % 8, n):
        total = total + x[:, j]
    return total
