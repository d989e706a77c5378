"""Command-line flags of sd-webui-spm (read by the WebUI before it parses its arguments)."""


def preload(parser):
    parser.add_argument("--spm-dir", type=str, default=None,
                        help="folder of SPM files (default: models/spm under the WebUI's models folder)")
    parser.add_argument("--spm-enforce", type=str, default=None,
                        help="operator: SPMs applied to every generation that users cannot switch off, "
                             "as 'name:strength,name2' (names in the SPM folder); generation is refused "
                             "when none of them fits the loaded model")
