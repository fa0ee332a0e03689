"""Editing with a teacher or a few-step student: Imagic, SDEdit, inpainting, textual inversion and
DreamBooth, sharing the one training loop (``baselines.train``) and one partial-trajectory sampler
(``editing.common.ddim_partial`` via ``editing.sdedit.img2img``)."""
