"""pcamlib: a reproducible PatchCamelyon (PCam) study toolkit."""

import warnings

# fastai still decorates a few helpers with torch.jit.script, which torch 2.14 flags on
# every import; the warning is about fastai's code, not ours, and clutters notebooks.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated",
                        category=FutureWarning)

__version__ = "0.1.0"
