"""`flexolmo serve`: an OpenAI-compatible server for a merged model, in which every request runs only the
experts its caller may use (a per-row expert mask, batched continuously), reports each expert's share of its
routing, and follows the coordinator's signed active set so that an opted-out expert is dropped at the next
request. See `app` (HTTP), `server` (one served model), `access` (keys and narrowing), `follow` (the active
set, from a file or a URL) and `engine` (the scheduler)."""
