"""A stand-in for the parts of AUTOMATIC1111's ``modules`` package the extension touches.

Written for these tests from the WebUI v1.10.1 surface recorded in tests/fixtures/webui_api_surface.json
(names and signatures are checked against it in test_webui_script.py); behaviour is the small part
the extension relies on, not a copy of the WebUI.
"""
