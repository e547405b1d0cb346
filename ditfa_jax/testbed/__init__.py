"""A small trained testbed for text-to-image diffusion: a captioned world of coloured shapes where the truth is known.

:mod:`.world` samples, captions and renders scenes (pure JAX, so training can render on the GPU), :mod:`.tokenizer`
turns captions into word ids, :mod:`.detector` reads objects back from pixels to score prompt fidelity,
:mod:`.metrics` holds PSNR / SSIM and an image grid for eyeballing samples, and :mod:`.features` a Fréchet distance
in the feature space of a small net trained on world renders (a distribution-level score beside them).
"""
