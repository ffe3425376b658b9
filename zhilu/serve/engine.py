"""Generation with continuous batching: sequences join and leave a running batch at token boundaries.

One thread owns the model. Each turn it admits waiting sequences into free slots of a
key/value cache (a prefill each), then decodes one token for every running sequence in one
batched forward per model version, samples, and sends each sequence its new text. A model
without a cache (:meth:`make_cache`) is run on each sequence's whole context instead, one
sequence at a time: the same tokens, without the speed.

Model updates: :meth:`Engine.swap` makes a newer model the one new sequences start on;
a running sequence finishes on the model it started with, so no response mixes two.

    engine = Engine(run.model, run.step, run.max_seq_len, run.tokenizer)
    seq = engine.submit(prompt_ids, SamplingParams(max_tokens=32, temperature=0))
    text = engine.wait(seq)
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from zhilu.serve.loading import TextTokenizer


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0: the most likely token
    top_p: float = 1.0
    seed: int | None = None  # the same seed, prompt and model give the same text
    stop: tuple[str, ...] = ()  # the text ends before the first of these


@dataclass(frozen=True)
class Version:
    """A model and the checkpoint step its weights came from."""

    model: nn.Module
    step: int


@dataclass
class Event:
    text: str = ""  # new text since the last event
    token_ids: list[int] = field(default_factory=list)  # new ids since the last event
    finish_reason: str | None = None  # stop | length, on the last event
    error: str | None = None


@dataclass(eq=False)  # each sequence is itself, whatever it holds
class Sequence:
    prompt: list[int]
    params: SamplingParams
    version: Version
    sink: Callable[[Event], None]
    generator: torch.Generator | None = None
    events: queue.SimpleQueue[Event] | None = None  # where the events go without a sink
    tokens: list[int] = field(default_factory=list)  # generated
    text: str = ""  # generated text sent so far
    slot: int = -1
    finish_reason: str | None = None
    cancelled: bool = False
    submitted: float = field(default_factory=time.perf_counter)
    first_token: float | None = None


class Engine:
    """The model's one thread: admits, decodes and samples for every sequence submitted."""

    def __init__(self, model: nn.Module, step: int, max_len: int, tokenizer: TextTokenizer | None,
                 max_batch: int = 32, on_step: Callable[[int, int], None] | None = None) -> None:
        self.max_len, self.tokenizer, self.max_batch = max_len, tokenizer, max_batch
        self.version = Version(model, step)
        self.device = next(model.parameters()).device
        make_cache = getattr(model, "make_cache", None)
        self.cache = make_cache(max_batch, max_len) if callable(make_cache) else None
        self.on_step = on_step  # (batch size, waiting) after each decoding turn
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._free = list(range(max_batch))[::-1]
        self._wake = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="zhilu-engine", daemon=True)
        self._thread.start()

    # -- the caller's side -----------------------------------------------------------------
    def submit(self, prompt: list[int], params: SamplingParams, sink: Callable[[Event], None] | None = None,
               index: int = 0, version: Version | None = None) -> Sequence:
        """Queue a sequence on ``version`` (default: the current model); its events go to ``sink``
        (default: a queue for :meth:`wait`). ``index`` tells the ``n`` sequences of one seeded
        request apart."""
        generator = None
        if params.temperature > 0:
            generator = torch.Generator(self.device)
            if params.seed is None:
                generator.seed()
            else:
                generator.manual_seed(params.seed * 1_000_003 + index)
        events: queue.SimpleQueue[Event] | None = None if sink is not None else queue.SimpleQueue()
        with self._wake:
            seq = Sequence(list(prompt), params, version or self.version, sink or events.put,  # type: ignore
                           generator, events)
            self.waiting.append(seq)
            self._wake.notify()
        return seq

    def wait(self, seq: Sequence) -> str:
        """The whole text of a sequence submitted without a sink, once it has finished."""
        assert seq.events is not None, "wait() is for sequences submitted without a sink"
        while True:
            event = seq.events.get()
            if event.error:
                raise RuntimeError(event.error)
            if event.finish_reason:
                return seq.text

    def swap(self, model: nn.Module, step: int) -> None:
        """Start new sequences on ``model`` (weights of checkpoint ``step``); running ones keep theirs."""
        with self._wake:
            self.version = Version(model, step)

    def cancel(self, seq: Sequence) -> None:
        """Stop generating for ``seq`` (its client has gone); nothing more is sent to it."""
        seq.cancelled = True
        with self._wake:
            if seq in self.waiting:
                self.waiting.remove(seq)

    def queued(self) -> int:
        return len(self.waiting)

    def close(self) -> None:
        with self._wake:
            self._stopped = True
            self._wake.notify()
        self._thread.join(timeout=10)

    # -- the model's thread ----------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stopped and not self.waiting and not self.running:
                    self._wake.wait()
                if self._stopped:
                    return
                admitted = []
                while self.waiting and self._free:
                    seq = self.waiting.popleft()
                    if seq.cancelled:
                        continue
                    seq.slot = self._free.pop()
                    admitted.append(seq)
            try:
                with torch.inference_mode():
                    for seq in admitted:
                        self._prefill(seq)
                    self._decode()
            except Exception as e:  # a bug must not hang the requests: fail them and go on
                for seq in admitted + self.running:
                    if seq.finish_reason is None:
                        seq.finish_reason = "error"
                        seq.sink(Event(error=f"generation failed: {type(e).__name__}: {e}"))
                        self._release(seq)
                self.running = []
            if self.on_step is not None:
                self.on_step(len(self.running), len(self.waiting))

    def _prefill(self, seq: Sequence) -> None:
        if seq.params.max_tokens == 0 or len(seq.prompt) >= self.max_len:
            self._finish(seq, "length")
            return
        tokens = torch.tensor([seq.prompt], device=self.device)
        if self.cache is not None:
            positions = torch.arange(len(seq.prompt), device=self.device)[None]
            logits = seq.version.model(tokens, self.cache.select(torch.tensor([seq.slot]), positions))
        else:
            logits = seq.version.model(tokens[:, -self.max_len:])
        self.running.append(seq)
        self._accept(seq, logits[0, -1])

    def _decode(self) -> None:
        """One token for every running sequence, in one forward per model version."""
        by_version: dict[int, list[Sequence]] = {}
        for s in self.running:
            if s.cancelled and s.finish_reason is None:
                s.finish_reason = "cancelled"
                self._release(s)
            if s.finish_reason is not None:
                continue
            by_version.setdefault(id(s.version), []).append(s)
        for group in by_version.values():
            model = group[0].version.model
            if self.cache is not None:
                last = torch.tensor([[s.tokens[-1]] for s in group], device=self.device)
                rows = torch.tensor([s.slot for s in group])
                positions = torch.tensor([[len(s.prompt) + len(s.tokens) - 1] for s in group])
                logits = model(last, self.cache.select(rows, positions))[:, -1]
            else:
                logits = torch.cat([model(torch.tensor([(s.prompt + s.tokens)[-self.max_len:]],
                                                       device=self.device))[:, -1] for s in group])
            for s, row in zip(group, logits):
                self._accept(s, row)
        self.running = [s for s in self.running if s.finish_reason is None]

    def _accept(self, seq: Sequence, logits: torch.Tensor) -> None:
        """Sample the next token from ``logits`` [vocab], send what it adds, finish where it ends."""
        token = sample(logits, seq.params, seq.generator)
        if seq.first_token is None:
            seq.first_token = time.perf_counter()
        tok = self.tokenizer
        if tok is not None and tok.eos_id is not None and token == tok.eos_id:
            self._finish(seq, "stop")
            return
        seq.tokens.append(token)
        reason = "length" if (len(seq.tokens) >= seq.params.max_tokens
                              or len(seq.prompt) + len(seq.tokens) >= self.max_len) else None
        if tok is None:
            seq.sink(Event(token_ids=[token]))
        else:
            full = tok.decode(seq.tokens)
            cut = min((i for i in (full.find(s) for s in seq.params.stop) if i >= 0), default=-1)
            if cut >= 0:
                seq.sink(Event(token_ids=[token]))
                self._finish(seq, "stop", full[:cut])
                return
            if not reason:  # hold back what may begin a stop string, and an unfinished character
                hold = max((len(s) - 1 for s in seq.params.stop), default=0)
                self._send_text(seq, full[:len(full) - hold].rstrip("\ufffd"), [token])
            else:
                seq.sink(Event(token_ids=[token]))
        if reason:
            self._finish(seq, reason)

    def _send_text(self, seq: Sequence, upto: str, ids: list[int]) -> None:
        if upto.startswith(seq.text) and len(upto) > len(seq.text):
            seq.sink(Event(text=upto[len(seq.text):], token_ids=ids))
            seq.text = upto
        elif ids:
            seq.sink(Event(token_ids=ids))

    def _finish(self, seq: Sequence, reason: str, text: str | None = None) -> None:
        """End ``seq``, first sending the rest of its text (``text``: all of it, where a stop string cut it)."""
        if self.tokenizer is not None:
            self._send_text(seq, self.tokenizer.decode(seq.tokens) if text is None else text, [])
        seq.finish_reason = reason
        seq.sink(Event(finish_reason=reason))
        self._release(seq)

    def _release(self, seq: Sequence) -> None:
        with self._wake:
            if seq.slot >= 0:
                self._free.append(seq.slot)
                seq.slot = -1


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """A token from ``logits`` [vocab]: the most likely at temperature 0, else nucleus sampling."""
    logits = logits.float()
    if params.temperature == 0:
        return int(logits.argmax())
    probs = F.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(0) - sorted_probs < params.top_p  # the smallest set reaching top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))
