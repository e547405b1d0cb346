"""Testbed v2: a harder captioned world (up to 5 overlapping, textured objects incl. tiny ones, textured backgrounds,
captions that leave attributes and positions unspecified) and its detector, so that the conditional distribution is
multimodal and few-step sampling costs quality. :mod:`.world` samples, captions and renders scenes (pure JAX);
:mod:`.detector` reads objects back from pixels and scores only what each caption mentions.
"""
