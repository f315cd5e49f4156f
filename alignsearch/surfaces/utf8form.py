"""Multipart forms whose text is UTF-8, or refused: the server reads text as the CLI does.

The framework (Starlette's MultiPartParser) decodes a form field's bytes with the form's declared charset and,
where they are not of it, as Latin-1, and ignores a part's own charset: POST /api/search with a q of the bytes
x FF FE y searched for "x\\xff\\xfey", where the URL's ?q=%FF%FE and `alignsearch query` refuse such a text
(BadInputError, exit 6). The raw bytes are gone once the form is parsed, so the check runs while it is parsed:
the framework's parser, subclassed to look at each text part's name, declared charset and bytes as it ends
(its data is already capped at the form's max_part_size, and the body at the app's max_body_size, as before); a
file part's bytes are not text and stay untouched. The HTML5 _charset_ field is honoured in the same way: UTF-8
taken, any other charset refused (Starlette ignores it); a file field sent without a filename is parsed as a file
(as_file_part). Installed by a route class (`app.router.route_class`, FastAPI's documented way to give endpoints
another Request class).

This leans on Starlette's internals (Request._get_form, the parser's current part): tests/test_server.py's
form tests fail if a Starlette release stops calling them."""

from __future__ import annotations

import codecs
from collections.abc import Iterable
from contextlib import aclosing

from fastapi import Request
from fastapi.routing import APIRoute
from python_multipart.multipart import parse_options_header
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from alignsearch.errors import AlignSearchError, BadInputError

UTF8 = frozenset({"utf-8", "ascii"})  # the charsets (codecs' names) whose text is UTF-8: ASCII is a subset
CHARSET_FIELD = "_charset_"  # HTML5: a browser sends the form's encoding as this field's value


def shown(name: bytes) -> str:
    """A field name as an error shows it (not_utf8's way: UTF-8, other bytes as \\xNN; 40 characters)."""
    return name.decode("utf-8", "backslashreplace")[:40]


def charset_refusal(where: str, content_type: bytes | str | None) -> str | None:
    """Why a part (or the whole form) whose Content-Type is this cannot be read as UTF-8 (None when it can: no
    charset, or UTF-8's). A declared charset is refused even where the bytes happen to be ASCII: the sender
    means another encoding, and its first accented letter would be refused, or misread, with no warning now."""
    _, params = parse_options_header(content_type)
    declared = params.get(b"charset")
    if declared is None:
        return None
    return label_refusal(where, declared)


def label_refusal(where: str, declared: bytes | str) -> str | None:
    """Why text in this declared charset (a label, as a Content-Type's charset= or a _charset_ field gives it)
    cannot be read as UTF-8; None when it is UTF-8's (or ASCII's) name. Bytes (a header's, a form part's: of no
    known charset) are read as Latin-1; a str (a URL's, already read as UTF-8) is shown as it was sent."""
    label = declared if isinstance(declared, str) else declared.decode("latin-1")
    try:
        name = codecs.lookup(label).name
    except (LookupError, ValueError):  # ValueError: a label with a NUL in it (codecs' names are C strings)
        name = None
    if name in UTF8:
        return None
    return f"{where} is declared charset={label[:40]!r}: send its text as UTF-8 (charset=utf-8, or none)"


def part_refusal(name: bytes, content_type: bytes | None, value: bytes | None) -> str | None:
    """Why a form part cannot be taken (None when it can): its name not UTF-8, a charset other than UTF-8
    declared, or (a text part: value not None) bytes that are not UTF-8. A file part's content is not looked at."""
    if not is_utf8(name):
        return f"{shown(name)!r} in the form is not valid UTF-8: send a field's name as UTF-8"
    if value is None:
        return None
    declared = charset_refusal(f"{shown(name)!r} in the form", content_type)
    if declared is not None:
        return declared
    if not is_utf8(value):
        return f"{shown(name)!r} in the form is not valid UTF-8: send the UTF-8 bytes of the text"
    return None


def is_utf8(data: bytes | bytearray) -> bool:
    try:
        bytes(data).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def as_file_part(content_disposition: bytes, file_fields: frozenset[bytes]) -> bytes:
    """The Content-Disposition a part is parsed by: a file field's part sent without a filename (some clients,
    hand-built bodies) is given an empty one, so that it is parsed as a file, as a browser's file input with no
    name is (filename=""), and not as a text field, whose bytes (an image's: never UTF-8) would be refused, and
    capped at a text field's size. Any other part's is left as it is."""
    _, options = parse_options_header(content_disposition)
    if b"filename" in options or options.get(b"name") not in file_fields:
        return content_disposition
    return content_disposition + b'; filename=""'


class Utf8MultiPartParser(MultiPartParser):
    """Starlette's parser, refusing (BadInputError) a part part_refusal refuses, or a form with a charset other
    than UTF-8 (in its Content-Type, or in the HTML5 _charset_ field a browser fills with the form's encoding),
    before the endpoint runs; what it takes it decodes as before (UTF-8, the bytes being UTF-8). file_fields:
    the names of the form's file fields, parsed as files even when sent without a filename (as_file_part).

    Starlette ignores _charset_ (it decodes with the Content-Type's charset, else UTF-8, else Latin-1); here a
    _charset_ naming UTF-8 (or ASCII) is taken, and dropped from the form, as it says how the form is written,
    not what to search; one naming any other charset refuses the whole form, as a Content-Type's charset does,
    rather than reading its text in that charset: the server reads UTF-8 only, as the CLI does."""

    def __init__(self, *args, file_fields: frozenset[str] = frozenset(), **kwargs):
        super().__init__(*args, **kwargs)
        self.file_fields = frozenset(name.encode() for name in file_fields)

    async def parse(self):
        refusal = charset_refusal("the form", self.headers.get("Content-Type"))
        if refusal is not None:  # before any of the body is read
            raise BadInputError(refusal)
        return await super().parse()

    def on_headers_finished(self) -> None:
        part = self._current_part
        part.content_disposition = as_file_part(part.content_disposition, self.file_fields)
        super().on_headers_finished()
        # a file part's name only; a text part is judged whole as it ends
        if part.file is not None:
            self._refuse(part, None)

    def on_part_end(self) -> None:
        part = self._current_part
        if part.file is None:
            self._refuse(part, part.data)
            if part.field_name == CHARSET_FIELD:
                refusal = label_refusal(f"the form (its {CHARSET_FIELD} field)", bytes(part.data).strip())
                if refusal is not None:
                    raise BadInputError(refusal)
                return  # UTF-8, as is every form taken: no parameter to pass on
        super().on_part_end()

    @staticmethod
    def _refuse(part, value) -> None:
        _, options = parse_options_header(part.content_disposition)
        content_type = next((v for k, v in part.item_headers if k == b"content-type"), None)
        refusal = part_refusal(options.get(b"name", b""), content_type, value)
        if refusal is not None:
            raise BadInputError(refusal)


class RefusedForm(StarletteHTTPException):
    """A library error met while the framework reads a form: FastAPI passes an HTTPException on as it is (any
    other it answers "There was an error parsing the body"), and the app's handler answers the error carried."""

    def __init__(self, error: AlignSearchError):
        super().__init__(error.http_status, str(error))
        self.error = error


class Utf8FormRequest(Request):
    """A Request whose multipart form is parsed by Utf8MultiPartParser (Starlette's _get_form, its parser swapped);
    file_fields: the form's file fields (Utf8MultiPartParser)."""

    file_fields: frozenset[str] = frozenset()

    async def _get_form(self, *, max_files: int | float = 1000, max_fields: int | float = 1000,
                        max_part_size: int = 1024 * 1024):
        content_type, _ = parse_options_header(self.headers.get("Content-Type"))
        if self._form is None and content_type == b"multipart/form-data":
            try:
                async with aclosing(self.stream()) as stream:
                    parser = Utf8MultiPartParser(self.headers, stream, max_files=max_files, max_fields=max_fields,
                                                 max_part_size=max_part_size, file_fields=self.file_fields)
                    self._form = await parser.parse()
            except MultiPartException as exc:  # as Starlette answers it
                raise StarletteHTTPException(status_code=400, detail=exc.message) from None
            except AlignSearchError as exc:
                raise RefusedForm(exc) from None
        return await super()._get_form(max_files=max_files, max_fields=max_fields, max_part_size=max_part_size)


class Utf8FormRoute(APIRoute):
    """The route class whose endpoints read forms with Utf8FormRequest; file_fields: the forms' file fields
    (utf8_form_route sets them)."""

    file_fields: frozenset[str] = frozenset()

    def get_route_handler(self):
        handler = super().get_route_handler()
        file_fields = self.file_fields

        async def with_utf8_forms(request: Request):
            utf8_request = Utf8FormRequest(request.scope, request.receive)
            utf8_request.file_fields = file_fields
            return await handler(utf8_request)

        return with_utf8_forms


def utf8_form_route(*, file_fields: Iterable[str]) -> type[Utf8FormRoute]:
    """A Utf8FormRoute class whose forms have these file fields (an app's router.route_class is a class)."""
    return type("Utf8FormRoute", (Utf8FormRoute,), {"file_fields": frozenset(file_fields)})
