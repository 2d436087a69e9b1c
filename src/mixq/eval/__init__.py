"""mixq.eval: perplexity and KL divergence to the float model, zero-shot task accuracy,
image top-1 accuracy."""

from mixq.eval.common import logits_of, model_device
from mixq.eval.perplexity import FloatReference, lm_eval
from mixq.eval.vision import top1
from mixq.eval.zeroshot import TASKS, continuation_logprobs, encode_pair, zero_shot

__all__ = [
    "TASKS",
    "FloatReference",
    "continuation_logprobs",
    "encode_pair",
    "lm_eval",
    "logits_of",
    "model_device",
    "top1",
    "zero_shot",
]
