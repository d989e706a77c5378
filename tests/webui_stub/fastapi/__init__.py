"""The one piece of FastAPI the extension's routes use (the WebUI ships the real one)."""


class HTTPException(Exception):
    def __init__(self, status_code: int, detail=None, headers=None):
        super().__init__(detail)
        self.status_code, self.detail, self.headers = status_code, detail, headers
