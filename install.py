"""Run by the WebUI at start-up. Installs only what is missing; never touches torch, gradio or
transformers. Everything lib_spm needs at run time (torch, safetensors, numpy) ships with the
WebUI; diffusers is optional (used only to check files against reference architectures)."""

import launch

for module, package in (("safetensors", "safetensors"),):
    if not launch.is_installed(module):
        launch.run_pip(f"install {package}", f"sd-webui-spm requirement: {package}")
