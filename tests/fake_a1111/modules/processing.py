"""Fake `modules.processing`: the conditioning caches the host keeps across generations.

With `persistent_cond_cache` (the default) the host reuses a prompt's conditioning while its cache key is
unchanged, and that key does not include the loaded embeddings: the same prompt after a new embedding gets
the conditioning computed before it existed, unless the caches are emptied.
"""


class StableDiffusionProcessing:
    cached_uc = [None, None]
    cached_c = [None, None]


class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
    cached_hr_uc = [None, None]
    cached_hr_c = [None, None]
