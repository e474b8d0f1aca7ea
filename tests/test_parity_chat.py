"""Chat template and system prompts as vita/conversation.py (conv_qwen2p5_instruct) and the demos
build them; placeholder ids as vita/util/mm_utils.py::tokenizer_image_audio_token."""
import re

import pytest

from vita_engine.runtime.chat import SYSTEM_IMAGE, SYSTEM_LANG, SYSTEM_VIDEO, ChatFormat, system_prompt_for
from vita_engine.model.vita import AUDIO_TOKEN_INDEX, IMAGE_TOKEN_INDEX

# conversation.py::conv_qwen2p5_instruct.system[2], [0], [1] (the prompt text is data the model was trained on)
BASE = ("You are an AI robot and your name is VITA. \n- You are a multimodal large language model developed by the open "
        "source community. Your aim is to be helpful, honest and harmless. \n- You support the ability to communicate "
        "fluently and answer user questions in multiple languages of the user's choice. \n- If the user corrects the wrong "
        "answer you generated, you will apologize and discuss the correct answer with the user.")
IMAGE = BASE + (" \n- You must answer the question strictly according to the content of the image given by the user, and "
                "it is strictly forbidden to answer the question without the content of the image. Please note that you "
                "are seeing the image, not the video.")
VIDEO = BASE + (" \n- You must answer the question strictly according to the content of the video given by the user, and "
                "it is strictly forbidden to answer the question without the content of the video. Please note that you "
                "are seeing the video, not the image.")


def test_system_prompts_are_vitas():
    assert (SYSTEM_LANG, SYSTEM_IMAGE, SYSTEM_VIDEO) == (BASE, IMAGE, VIDEO)
    assert (system_prompt_for("lang"), system_prompt_for("image"), system_prompt_for("video")) == (BASE, IMAGE, VIDEO)


@pytest.mark.parametrize("n,audio,text,msg", [
    (2, False, "What is this?", "<image><image>\nWhat is this?"),  # video_audio_demo.py, image + question
    (2, True, "What is this?", "<image><image>\nWhat is this?<audio>"),  # ... + audio after the question
    (0, True, "Hi", "Hi<audio>"),
    (4, True, None, "<image><image><image><image><audio>"),  # web_demo/server.py "<video><audio>", 4 frames
    (0, True, None, "<audio>"),
])
def test_user_message_layout(n, audio, text, msg):
    assert ChatFormat.user_message(n, audio, text) == msg


def test_turn_ids_follow_the_template(tmp_path):
    from vita_engine.testing import tiny_tokenizer

    tok, _ = tiny_tokenizer()
    tok.save(str(tmp_path / "tokenizer.json"))
    fmt = ChatFormat(tmp_path)
    msg = "<image><image>\nWhat is in this picture?<audio>"
    prompt = f"<|im_start|>system\n{IMAGE}<|im_end|>\n<|im_start|>user\n{msg}<|im_end|>\n<|im_start|>assistant\n"
    ref = []  # tokenizer_image_audio_token: split on the placeholders, tokenize the text between them
    for chunk in re.split(r"(<audio>|<image>)", prompt):
        ref += [IMAGE_TOKEN_INDEX] if chunk == "<image>" else [AUDIO_TOKEN_INDEX] if chunk == "<audio>" else \
            tok.encode(chunk, add_special_tokens=False).ids
    assert fmt.turn_ids(msg, system=IMAGE, close_previous=False) == ref
