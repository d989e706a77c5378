"""Command-line flags of sd-webui-spm (read by the WebUI before it parses its arguments)."""


def preload(parser):
    parser.add_argument("--spm-dir", type=str, default=None,
                        help="folder of SPM files (default: models/spm under the WebUI's models folder)")
    parser.add_argument("--spm-enforce", type=str, default=None,
                        help="operator: SPMs applied to every generation that users cannot switch off or "
                             "weaken, as 'name:strength,name2' (names in the SPM folder); a generation is "
                             "refused when they cannot act")
    parser.add_argument("--spm-lockdown", action="store_true", default=False,
                        help="operator: no user SPMs at all, and the SPM tab cannot train, merge, bake, "
                             "rename, edit or delete (use with --spm-enforce)")
