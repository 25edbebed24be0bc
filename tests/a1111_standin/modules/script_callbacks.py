callbacks = {"ui_settings": [], "model_loaded": [], "script_unloaded": []}


def on_ui_settings(callback, *, name=None):
    callbacks["ui_settings"].append(callback)


def on_model_loaded(callback, *, name=None):
    callbacks["model_loaded"].append(callback)


def on_script_unloaded(callback, *, name=None):
    callbacks["script_unloaded"].append(callback)


def model_loaded_callback(sd_model):
    for c in callbacks["model_loaded"]:
        c(sd_model)


def script_unloaded_callback():
    for c in callbacks["script_unloaded"]:
        c()
    for v in callbacks.values():
        v.clear()
