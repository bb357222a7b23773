"""pcamlib: a reproducible PatchCamelyon (PCam) study toolkit."""

import warnings

# fastai still decorates a few helpers with torch.jit.script, which torch 2.14 flags on
# every import; the warning is about fastai's code, not ours, and clutters notebooks.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated",
                        category=FutureWarning)

# Accelerate (imported by fastai.distributed) imports tqdm.auto, which warns in a notebook
# without ipywidgets; pcamlib draws text bars, so the warning says nothing to the reader.
warnings.filterwarnings("ignore", message="IProgress not found")

__version__ = "0.1.0"
