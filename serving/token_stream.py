"""From generated tokens to what a client receives, for every backend that hands the service token ids (our engine,
the OpenVINO GenAI worker): time the token for the metrics, finish at EOS / a stop sequence / max_tokens, decode the
text incrementally (holding back an incomplete character or the possible start of a stop sequence) and push
`Event`s to the request's stream."""
from __future__ import annotations

import time

from .requests import Event, Request


class TokenStream:
    def __init__(self, tokenizer, eos_ids: set[int], metrics=None):
        self.tok, self.eos, self.metrics = tokenizer, set(eos_ids), metrics

    def accept(self, req: Request, tok: int, logprob: float = 0.0) -> bool:
        """One generated token of `req`: stream its text, finish the request when it is done. True when finished."""
        now = time.perf_counter()
        if self.metrics:
            self.metrics.token(req, now)
        if req.first_token is None:
            req.first_token = now
        req.last_token = now
        req.logprob_sum += logprob
        if tok in self.eos and not req.params.ignore_eos:
            self.finish(req, "stop", flush=True)
            return True
        req.generated.append(tok)
        if self._emit(req, final=False):
            self.finish(req, "stop")
        elif len(req.generated) >= req.params.max_tokens:
            self.finish(req, "length", flush=True)
        return req.finish is not None

    def finish(self, req: Request, reason: str, error: str | None = None, flush: bool = False) -> None:
        """End `req` (once): count it and send the last event; flush: first stream the text held back."""
        if req.finish is not None:
            return
        if flush:
            self._emit(req, final=True)
        req.finish = reason
        if self.metrics:
            self.metrics.finished(req, error)
        req.push(Event("", len(req.generated), finish=reason, error=error, logprob_sum=req.logprob_sum))

    def _emit(self, req: Request, final: bool) -> bool:
        """Stream the new text of `req`; True when a stop sequence appeared (text cut before it)."""
        text = self.tok.decode(req.generated, skip_special_tokens=True)
        stops = req.params.stops
        hit = -1
        if stops:
            start = max(0, req.sent - max(len(s) for s in stops))
            found = [i for i in (text.find(s, start) for s in stops) if i >= 0]
            hit = min(found) if found else -1
        if hit >= 0:
            text, final = text[:hit], True
        end = len(text)
        if not final:
            if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the next token
                end = len(text.rstrip("\ufffd"))
            if stops:  # hold back what could be the start of a stop sequence
                hold = max(len(s) for s in stops) - 1
                end = min(end, max(req.sent, len(text) - hold))
        if end > req.sent:
            req.push(Event(text[req.sent:end], len(req.generated)))
            req.sent = end
        return hit >= 0
