"""A stand-in for the pieces of Stable Diffusion WebUI Forge (main ``dfdcbab6``) the extension
touches, modelled on Forge's code (written for these tests, not copied): ``backend.operations``
(its non-``nn.Linear`` Linear), ``backend.sampling.sampling_function`` (the batch-row layout),
``backend.diffusion_engine.sd15`` (the engine ``shared.sd_model`` is: ``forge_objects``, the text
processing engine, lazy inference-mode encoding) and :mod:`.miniforge` (``process_images`` as
Forge runs it: the model loaded lazily after ``before_process``, no uncond at CFG 1).

``modules.*`` keep v1.10.1's interfaces in Forge, so the A1111 stand-in (tests/webui_stub)
serves for them.
"""
