"""The eager reference step at a fixed context: what `ReferenceEngine` runs per step.

The caches are put at `context` committed positions (random K/V, no prefill
needed), then each call drafts a block, verifies it, reads the accepted
tokens back to the host and rolls both caches back, so every timed step sees
the same context. Router hooks record how many distinct experts each MoE
layer's block tokens chose: the floor counts exactly those experts.
"""
import torch

from tilecomp.models.mimo import Router
from tilecomp.runtime.reference import accepted_length


class EagerStep:
    def __init__(self, target, draft, context: int, block: int, seed: int = 0):
        self.target, self.draft, self.context, self.T = target, draft, context, block
        cfg, w = target.config, target.lm_head.weight
        self.cache = target.new_cache(1, context + 2 * block, block=block)
        g = torch.Generator(device=w.device).manual_seed(seed)
        for k, v in zip(self.cache.k, self.cache.v):
            k.copy_(torch.randn(k.shape, generator=g, device=w.device))
            v.copy_(torch.randn(v.shape, generator=g, device=w.device))
        self.cache.length = context
        self.cache.low = [max(0, context - self.cache.slots(i)) for i in range(cfg.num_hidden_layers)]
        self.use_draft = draft is not None and block > 1
        if self.use_draft:
            dc = draft.config
            self.draft_cache = draft.new_cache(1, context + 2 * block)
            self.draft_cache.length = context - 1
            self.tap_ids = list(dc.target_layer_ids)
            self.taps = torch.randn(1, 1, len(self.tap_ids) * cfg.hidden_size, generator=g,
                                    device=w.device).to(w.dtype)
            self.mask_id = dc.mask_token_id
        self.unique_experts = [0] * cfg.num_hidden_layers
        self._hooks = [m.register_forward_hook(self._record(i)) for i, m in self._routers()]
        self.last_token = 1

    def _routers(self):
        for i, layer in enumerate(self.target.model.layers):
            for m in layer.modules():
                if isinstance(m, Router):
                    yield i, m

    def _record(self, i: int):
        def hook(module, inputs, output):
            self.unique_experts[i] = int(output[1].unique().numel())
        return hook

    @torch.no_grad()
    def __call__(self) -> int:
        dev, C, T = self.target.lm_head.weight.device, self.context, self.T
        if not self.use_draft:
            ids = torch.tensor([[self.last_token]], device=dev)
            logits = self.target(ids, cache=self.cache, start_pos=C)
            int(logits[0, -1].argmax())                          # the host read-back
            self.cache.crop(C)
            return 1
        block = torch.full((1, T), self.mask_id, dtype=torch.long, device=dev)
        block[0, 0] = self.last_token
        self.draft_cache.crop(C - 1)
        draft_logits = self.draft(block, self.taps, self.draft_cache, C, self.target)
        block[0, 1:] = draft_logits[0, 1:].argmax(-1)
        logits, _ = self.target(block, cache=self.cache, start_pos=C, tap_layers=self.tap_ids)
        posterior = logits[0].argmax(-1)
        acc = accepted_length(block[0, 1:], posterior[:-1])                    # the host read-back
        self.cache.crop(C)
        return acc + 1

    def close(self):
        for h in self._hooks:
            h.remove()
