"""Softmax cross-entropy on integer labels."""
from . import backend


def log_softmax(logits):
    xp = backend.get_array_module(logits)
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - xp.log(xp.exp(shifted).sum(axis=1, keepdims=True))


class SoftmaxCrossEntropy:
    """Mean cross-entropy of softmax(logits) against integer labels.

    forward returns the loss as a 0-d array (no host sync); backward returns dlogits.
    """

    def forward(self, logits, labels):
        xp = backend.get_array_module(logits, labels)
        if logits.ndim != 2:
            raise ValueError(f"logits must be (batch, classes), got shape {logits.shape}")
        if labels.shape != (logits.shape[0],):
            raise ValueError(f"labels must be ({logits.shape[0]},) to match logits {logits.shape}, "
                             f"got shape {labels.shape}")
        logp = log_softmax(logits)
        n = logits.shape[0]
        self._cache = (logp, labels)
        return -logp[xp.arange(n), labels].mean()

    __call__ = forward

    def backward(self):
        logp, labels = self._cache
        xp = backend.get_array_module(logp)
        n = logp.shape[0]
        d = xp.exp(logp)
        d[xp.arange(n), labels] -= 1.0
        return d / n
