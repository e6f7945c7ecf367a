"""``/v1/audio/transcriptions`` and ``/v1/audio/translations`` in OpenAI's shape (a multipart
form: ``file``, ``model`` and the request's fields).

The form's other fields are the model's params, checked by its engine's params schema as on
``/v1/infer``: one the model does not take is refused (422) naming it. A speech-to-text model
whose engine answers these routes itself takes its engine's fields (``language``, ``prompt``,
``temperature``, ``timestamp_granularities[]``...). A CTC recognizer (wav2vec2) takes only what it honours:
``language``, as the client states it (the model neither detects nor uses one; ``verbose_json``
reports it, and reports no language without it), and nothing else: ``prompt``, ``temperature``
and the like are refused, as greedy CTC decoding has no use for them. Either way the upload
goes through the model's audio pipeline (decoded, resampled, its limits applied) and the
pipeline's ``transcript`` postprocess renders the answer in ``response_format``: ``json`` and
``verbose_json`` as JSON, ``text``, ``srt`` and ``vtt`` as plain text. A model transcribes
where its params take a ``response_format``.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, File, Form, UploadFile
from fastapi.responses import PlainTextResponse

from api.call import Call, CallDep
from api.context import run_pipeline
from api.errors import ERROR_RESPONSES
from api.uploads import uploaded_media
from core.errors import InvalidField, InvalidParameter
from core.protocol import InferRequest

router = APIRouter()

Format = Literal["json", "text", "verbose_json", "srt", "vtt"]
#: the form fields that are not the engine's params
FORM_FIELDS = ("file", "model", "response_format")


def _params(form, model_id: str) -> dict[str, Any]:
    """The form's other fields as params; ``name[]`` (how clients send a list) as a list."""
    params: dict[str, Any] = {}
    for key in form.keys():
        if key in FORM_FIELDS:
            continue
        values = form.getlist(key)
        if any(not isinstance(v, str) for v in values):
            raise InvalidParameter(f"{key}: a text field, not a file", model_id=model_id, field=key)
        params[key.removesuffix("[]")] = values if key.endswith("[]") else values[-1]
    return params


async def speech_to_text(call: Call, task: str, file: UploadFile, model: str, response_format: str):
    pipeline = call.pipeline(model)
    if pipeline.model.modality != "audio":
        route = "transcriptions" if task == "transcribe" else "translations"
        raise InvalidField(f"model: {model!r} is a {pipeline.model.modality} model; {route} need a "
                           f"speech recognition model", model_id=model, field="model")
    speech = "transcription" in pipeline.openai_routes  # its engine answers speech to text itself
    if task == "translate" and "translation" not in pipeline.openai_routes:
        raise InvalidField(f"model: {model!r} does not translate speech; translations need a model "
                           f"whose engine answers translations", model_id=model, field="model")
    if "response_format" not in pipeline.params_schema.model_fields:
        raise InvalidField(f"model: {model!r} does not transcribe speech (its pipeline answers "
                           f"{pipeline.model.pipeline!r} results)", model_id=model, field="model")
    params = {**_params(await call.request.form(), model), "response_format": response_format}
    if speech:
        params["task"] = task
    req = InferRequest(model_id=model, input=await uploaded_media(file), params=params)
    try:
        result = await run_pipeline(pipeline, req, call.infer_context(req))
    except InvalidField as err:  # a param is a form field here: name it as the client sent it
        if err.field and err.field.startswith("params."):
            err.field = err.field.removeprefix("params.")
            err.message = err.message.removeprefix("params.")
        raise
    output = result["output"]
    return PlainTextResponse(output) if isinstance(output, str) else output


def _route(path: str, task: str, summary: str, takes: str) -> None:
    async def handler(
        call: CallDep,
        file: UploadFile = File(..., description="The audio file (wav, flac, mp3, ogg)."),
        model: str = Form(..., min_length=1, description=f"A {takes} model_id."),
        response_format: Format = Form("json"),
    ):
        return await speech_to_text(call, task, file, model, response_format)

    handler.__name__ = "transcriptions" if task == "transcribe" else "translations"
    handler.__doc__ = "Other form fields (``language``, ``prompt``, ``temperature``...) are the model's params."
    router.add_api_route(path, handler, methods=["POST"], responses=ERROR_RESPONSES, summary=summary)


_route("/v1/audio/transcriptions", "transcribe", "OpenAI-compatible speech to text", "speech recognition")
_route("/v1/audio/translations", "translate", "OpenAI-compatible speech to English text", "speech translation")
