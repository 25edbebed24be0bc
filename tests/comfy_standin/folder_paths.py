"""Stand-in for ComfyUI's ``folder_paths`` (tests only). Tests set ``folder_names_and_paths["vae"]``."""
import os

folder_names_and_paths: dict = {"vae": []}


def get_folder_paths(folder_name):
    return list(folder_names_and_paths.get(folder_name, []))


def get_filename_list(folder_name):
    out = []
    for base in get_folder_paths(folder_name):
        for root, _dirs, files in os.walk(base, followlinks=True):
            for f in files:
                out.append(os.path.relpath(os.path.join(root, f), base).replace(os.sep, "/"))
    return sorted(out)


def get_full_path(folder_name, filename):
    for base in get_folder_paths(folder_name):
        full = os.path.join(base, filename)
        if os.path.isfile(full):
            return full
    return None
