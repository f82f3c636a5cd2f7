"""The JSON field names each HTTP route's body may hold, from the compiled contracts, and the Lua that refuses others.

Envoy's JSON transcoder drops a body's unknown fields silently (it has no option to refuse them:
envoyproxy/envoy#46623), so `{"userId": "<bob>"}` sent to `/v1/auth:revokeAllSessions` revoked the caller's own
sessions without a word. The edge's Lua filter scans every JSON body with these tables before the transcoder and
answers 400 naming the first field the method does not have.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor_pb2

# The request header by which the Lua filter tells the local reply which field it refused (removed from every
# incoming request first, so a client cannot set it).
UNKNOWN_FIELD_HEADER = "x-voiceassist-unknown-field"

# Messages whose JSON object takes any keys, and those whose JSON form is not an object at all.
_ANY_KEYS = {".google.protobuf.Struct", ".google.protobuf.Value", ".google.protobuf.ListValue", ".google.protobuf.Any"}
_NOT_OBJECTS = {
    ".google.protobuf." + name
    for name in ("Timestamp", "Duration", "FieldMask", "Empty", "DoubleValue", "FloatValue", "Int64Value",
                 "UInt64Value", "Int32Value", "UInt32Value", "BoolValue", "StringValue", "BytesValue")
}  # fmt: skip
_VERBS = ("get", "put", "post", "delete", "patch")
_MESSAGE = descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE


def _messages(fds: descriptor_pb2.FileDescriptorSet) -> dict[str, descriptor_pb2.DescriptorProto]:
    found: dict[str, descriptor_pb2.DescriptorProto] = {}

    def add(prefix: str, message: descriptor_pb2.DescriptorProto) -> None:
        name = f"{prefix}.{message.name}"
        found[name] = message
        for nested in message.nested_type:
            add(name, nested)

    for f in fds.file:
        for message in f.message_type:
            add(f".{f.package}" if f.package else "", message)
    return found


def _rules(rule: http_pb2.HttpRule) -> Iterable[http_pb2.HttpRule]:
    yield rule
    for binding in rule.additional_bindings:
        yield from _rules(binding)


def path_pattern(template: str) -> str:
    """A Lua pattern matching the paths of an HTTP rule's template (`/v1/documents/{document_id}:reindex`)."""
    pattern = []
    for part in re.split(r"(\{[^}]*\})", template):
        if part.startswith("{"):
            _, _, sub = part[1:-1].partition("=")
            part = sub or "*"
        for piece in re.split(r"(\*\*|\*)", part):
            if piece == "**":
                pattern.append(".+")
            elif piece == "*":
                pattern.append("[^/]+")
            else:
                pattern.append(re.sub(r"([^\w/])", r"%\1", piece))
    return "^" + "".join(pattern) + "$"


def body_fields(
    descriptor: bytes, services: Iterable[str]
) -> tuple[list[tuple[str, str, str]], dict[str, dict[str, str | bool]]]:
    """The JSON routes of `services` (gRPC names) that take a body, as (HTTP method, Lua path pattern, message
    name), and for each message the body may hold, its field names (JSON and proto) -> the field's message name
    (an object whose keys are checked too), True (any keys: maps, Struct, Any) or "" (not an object).

    Routes with a custom verb come first, so `/v1/documents/x:reindex` is not taken for `/v1/documents/{id}`.
    """
    fds = descriptor_pb2.FileDescriptorSet.FromString(descriptor)
    messages = _messages(fds)
    wanted = set(services)
    routes: list[tuple[str, str, str]] = []
    for f in fds.file:
        for svc in f.service:
            if f"{f.package}.{svc.name}" not in wanted:
                continue
            for method in svc.method:
                # googleapis-common-protos' stubs type `http` a plain FieldDescriptor, not an extension.
                http: http_pb2.HttpRule = method.options.Extensions[annotations_pb2.http]  # type: ignore[index]
                for rule in _rules(http):
                    if not rule.body:
                        continue
                    verb = rule.WhichOneof("pattern")
                    http_method, template = (
                        (rule.custom.kind, rule.custom.path)
                        if verb == "custom"
                        else (verb.upper(), getattr(rule, verb))
                    )
                    message = method.input_type
                    if rule.body != "*":
                        body = next(fd for fd in messages[message].field if fd.name == rule.body)
                        if body.type != _MESSAGE or body.type_name in _ANY_KEYS | _NOT_OBJECTS:
                            continue  # a scalar, or an object of any keys: nothing to check
                        message = body.type_name
                    routes.append((http_method, path_pattern(template), message))
    routes.sort(key=lambda r: ":" not in r[1].rsplit("/", 1)[-1])

    fields: dict[str, dict[str, str | bool]] = {}
    pending = [m for _, _, m in routes]
    while pending:
        name = pending.pop()
        if name in fields:
            continue
        known: dict[str, str | bool] = {}
        for fd in messages[name].field:
            spec: str | bool = ""
            if fd.type == _MESSAGE:
                entry = messages[fd.type_name]
                if entry.options.map_entry or fd.type_name in _ANY_KEYS:
                    spec = True
                elif fd.type_name not in _NOT_OBJECTS:
                    spec = fd.type_name
                    pending.append(fd.type_name)
            known[fd.name] = known[fd.json_name or fd.name] = spec
        fields[name] = known
    return routes, fields


def _lua(value: str | bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def lua_tables(descriptor: bytes, services: Iterable[str]) -> str:
    """Lua definitions of ROUTES and MESSAGES (see `body_fields`), for SCANNER."""
    routes, fields = body_fields(descriptor, services)
    lines = ["local ROUTES = {"]
    lines += [f"  {{{_lua(m)}, {_lua(p)}, {_lua(name)}}}," for m, p, name in routes]
    lines += ["}", "local MESSAGES = {"]
    for name, known in sorted(fields.items()):
        entries = ", ".join(f"[{_lua(k)}] = {_lua(v)}" for k, v in sorted(known.items()))
        lines.append(f"  [{_lua(name)}] = {{{entries}}},")
    lines.append("}")
    return "\n".join(lines) + "\n"


# The scanner: a pure-Lua JSON tokenizer that visits only the keys of objects whose message it knows, and skips
# everything else (string contents with string.find, whole unchecked values by their brackets), so a base64
# document body costs a few C-speed searches. JSON malformed before any unknown key yields nil: the transcoder
# answers it with 400.
SCANNER = r"""
local ESCAPES = {b = "\b", f = "\f", n = "\n", r = "\r", t = "\t"}
local MAX_DEPTH = 100  -- protobuf's own JSON nesting limit: deeper bodies are the transcoder's to refuse

-- The index of the quote closing the string opened at i, or nil. A plain find (a memchr) runs through a
-- megabyte of base64 in well under a millisecond, where a character-class pattern takes ~15 ms.
local function string_end(s, i)
  local j = i + 1
  while true do
    local k = string.find(s, '"', j, true)
    if k == nil then return nil end
    local b = k - 1
    while string.byte(s, b) == 92 do b = b - 1 end  -- stops at the opening quote at the latest
    if (k - 1 - b) % 2 == 0 then return k end  -- an even run of backslashes escapes only itself
    j = k + 1
  end
end

-- A JSON string's text (escapes decoded; non-ASCII \u escapes become "?": no field name has them).
local function decode(raw)
  if not string.find(raw, "\\", 1, true) then return raw end
  local out, i = {}, 1
  while true do
    local k = string.find(raw, "\\", i, true)
    if k == nil then out[#out + 1] = string.sub(raw, i); break end
    out[#out + 1] = string.sub(raw, i, k - 1)
    local c = string.sub(raw, k + 1, k + 1)
    if c == "u" then
      local n = tonumber(string.sub(raw, k + 2, k + 5), 16)
      out[#out + 1] = (n ~= nil and n < 128) and string.char(n) or "?"
      i = k + 6
    else
      out[#out + 1] = ESCAPES[c] or c
      i = k + 2
    end
  end
  return table.concat(out)
end

-- The index just past the object or array opened at i, whatever it holds, or nil.
local function skip_container(s, i)
  local level = 0
  while true do
    i = string.find(s, '[%[%]{}"]', i)
    if i == nil then return nil end
    local c = string.byte(s, i)
    if c == 34 then
      i = string_end(s, i)
      if i == nil then return nil end
    elseif c == 123 or c == 91 then
      level = level + 1
    else
      level = level - 1
      if level == 0 then return i + 1 end
    end
    i = i + 1
  end
end

-- The path of the first key of `s` that its message (MESSAGES[root]) does not have, or nil.
local function first_unknown_field(s, root)
  local stack, depth = {}, 0
  local i, spec, path = 1, MESSAGES[root], ""
  local expect_key = false
  while true do
    i = string.find(s, "[^ \t\r\n]", i)
    if i == nil then return nil end
    local c = string.byte(s, i)
    if expect_key then
      -- i is at a key (or at the closing brace of an empty object, handled below as the end of a value)
      expect_key = false
      if c == 34 then
        local e = string_end(s, i)
        if e == nil then return nil end
        local key = decode(string.sub(s, i + 1, e - 1))
        local frame = stack[depth]
        local known = frame[2]
        local child = known[key]
        local at = frame[3] == "" and key or (frame[3] .. "." .. key)
        if child == nil then return at end
        spec, path = (child ~= true and child ~= "") and MESSAGES[child] or nil, at
        i = string.find(s, "[^ \t\r\n]", e + 1)
        if i == nil or string.byte(s, i) ~= 58 then return nil end
        i = i + 1
        goto value
      elseif c ~= 125 then
        return nil
      end
      -- "{}": fall through to the end of a value, the brace closing the object
    else
      goto value_at
    end
    goto after
    ::value::
    i = string.find(s, "[^ \t\r\n]", i)
    if i == nil then return nil end
    c = string.byte(s, i)
    ::value_at::
    if (c == 123 or c == 91) and (spec == nil or depth >= MAX_DEPTH) then
      i = skip_container(s, i)
      if i == nil then return nil end
    elseif c == 123 then
      depth = depth + 1
      stack[depth] = {true, spec, path}
      i = i + 1
      expect_key = true
      goto continue
    elseif c == 91 then
      depth = depth + 1
      stack[depth] = {false, spec, path, 0}
      i = string.find(s, "[^ \t\r\n]", i + 1)
      if i == nil then return nil end
      if string.byte(s, i) ~= 93 then
        path = path .. "[0]"
        goto value
      end
    elseif c == 34 then
      i = string_end(s, i)
      if i == nil then return nil end
      i = i + 1
    else
      i = string.find(s, "[,%]}%s]", i)
      if i == nil then return nil end
    end
    ::after::
    -- After a value (or at the bracket closing an empty container): a comma or the ends of containers.
    while true do
      if depth == 0 then return nil end
      i = string.find(s, "[^ \t\r\n]", i)
      if i == nil then return nil end
      c = string.byte(s, i)
      local frame = stack[depth]
      if c == 44 then
        i = i + 1
        if frame[1] then
          expect_key = true
        else
          frame[4] = frame[4] + 1
          spec, path = frame[2], frame[3] .. "[" .. frame[4] .. "]"
          goto value
        end
        break
      elseif (c == 125 and frame[1]) or (c == 93 and not frame[1]) then
        depth = depth - 1
        i = i + 1
      else
        return nil
      end
    end
    ::continue::
  end
end

-- The message a JSON request's body holds, or nil (no body, or nothing to check).
local function body_message(method, path)
  path = string.match(path, "^[^?]*")
  for _, route in ipairs(ROUTES) do
    if route[1] == method and string.find(path, route[2]) then return route[3] end
  end
  return nil
end
"""
