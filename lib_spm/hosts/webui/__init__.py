"""The AUTOMATIC1111 WebUI host (v1.10.1), and Forge (f2, on v1.10.1): the only package that knows
their internals.

Nothing outside it imports the WebUI's ``modules``; ``scripts/spm.py`` only subclasses the
WebUI's classes and registers callbacks that call into it. Its rooms:

- ``gateway``    the one lookup of the WebUI's ``modules`` (stand-ins injectable)
- ``model``      the loaded model: its UNet, a UNet call's conditioning, its architecture
                 (``model_arch``; ``model_kind`` adds what training refuses)
- ``rows``       the batch-row layout of ``CFGDenoiser``: which text and tokens each row holds
                 (``tokens_for``/``rows_for`` pick Forge's for a Forge model)
- ``forge``      what differs in Forge: tokens through its text engine, rows as
                 ``calc_cond_uncond_batch`` lays them out (``model`` finds its UNet in ``forge_objects``)
- ``args``       the accordion's/API's arguments, ``<spm:...>`` tags, infotext keys and paste-back
- ``controller`` ``SPMController``: owns what is attached to the loaded model, and the UNet guard
                 that carries out refusals (the WebUI swallows what script hooks raise)
- ``extension``  ``Extension``: the per-process state (SPM folder, controller, jobs), cards, API
- ``tab``        ``WebUIHost``: the SPM tab's host (queue lock, progress, checkpoints)
- ``trainer``    ``WebUIBackend``: the trainer's backend on the loaded model
"""
