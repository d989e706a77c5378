import urllib.parse
import json
import os

pages = []


def quote_js(s):
    return json.dumps(s)


def register_page(page):
    pages.append(page)


class ExtraNetworksPage:
    def __init__(self, title):
        self.title = title
        self.name = title.lower()

    def search_terms_from_path(self, filename):
        return os.path.basename(filename)

    def get_sort_keys(self, path):
        st = os.stat(path)
        return {"date_created": int(st.st_ctime), "date_modified": int(st.st_mtime), "name": path.lower()}

    def link_preview(self, filename):
        return f"./sd_extra_networks/thumb?filename={urllib.parse.quote(filename)}&mtime={os.stat(filename).st_mtime}"

    def find_preview(self, path):
        for ext in ("png", "jpg", "webp", "preview.png"):
            if os.path.isfile(f"{path}.{ext}"):
                return self.link_preview(f"{path}.{ext}")
        return None

    def find_description(self, path):
        for f in (f"{path}.txt", f"{path}.description.txt"):
            if os.path.isfile(f):
                return open(f, encoding="utf8").read()
        return None
