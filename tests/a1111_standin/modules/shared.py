import re
import types


class OptionInfo:
    def __init__(self, default=None, label="", component=None, component_args=None, onchange=None, section=None,
                 refresh=None, comment_before="", comment_after="", infotext=None, restrict_api=False,
                 category_id=None):
        self.default, self.label, self.component, self.component_args = default, label, component, component_args
        self.onchange, self.section, self.refresh, self.infotext = onchange, section, refresh, infotext
        self.comment_after = comment_after

    def info(self, info):
        self.comment_after += f" ({info})"
        return self

    def needs_reload_ui(self):
        return self


class Options:
    def __init__(self):
        object.__setattr__(self, "data_labels", {})
        object.__setattr__(self, "data", {"sd_vae": "Automatic", "sd_vae_checkpoint_cache": 0})

    def add_option(self, key, info):
        self.data_labels[key] = info
        self.data.setdefault(key, info.default)

    def __getattr__(self, item):
        if item in self.data:
            return self.data[item]
        raise AttributeError(item)

    def __setattr__(self, key, value):
        self.data[key] = value


def natural_sort_key(s, regex=re.compile("([0-9]+)")):
    return [int(t) if t.isdigit() else t.lower() for t in regex.split(s)]


opts = Options()
cmd_opts = types.SimpleNamespace(vae_dir=None, ckpt_dir=None, vae_path=None)
state = types.SimpleNamespace(interrupted=False)
weight_load_location = None
sd_model = None
