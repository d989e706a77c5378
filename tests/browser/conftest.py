def pytest_configure(config):
    config.addinivalue_line("markers", "browser: serves the SPM tab with gradio 3.41.2 and drives it in Chromium "
                                       "(needs .venv-ui and /usr/bin/chromium: make ui-env)")
