//! The HTTP side of meshctl: one [`Client`] per invocation holds the API base URL and the
//! bearer token, offers one method per control-API route (see `mesh_proto::api`), and turns
//! every failure (no token, node down, refused token, error bodies) into an [`Error`] that says
//! what to try.

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::StreamExt;
use mesh_proto::api::{
    DeleteResponse, ErrorBody, ErrorCode, ListQuery, ListResponse, PeersResponse, PutQuery,
    PutResponse, ScrubStartResponse, ScrubStatus, StatResponse, StatusResponse, TOKEN_FILE,
};
use mesh_proto::job::{JobList, JobStatus, JobSubmit, SubmitResponse};
use mesh_proto::manifest::MAX_MANIFEST_LEN;
use mesh_proto::{JobId, Manifest, ObjectId};
use reqwest::header::{AUTHORIZATION, CONTENT_LENGTH, HeaderMap, HeaderValue};
use reqwest::{RequestBuilder, Response, StatusCode, Url};
use serde::de::DeserializeOwned;

use crate::error::{Error, describe_chain};

/// A connection that cannot be opened within this long counts as "cannot reach meshd". There
/// is no overall timeout: uploads and downloads take as long as the data needs.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Most bytes of an error response that are read; error bodies are small JSON.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// Where the bearer token came from, for the message when it is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    value: String,
    origin: String,
}

impl Token {
    /// `--token` / `MESH_API_TOKEN` if given, else `<data_dir>/api.token`, trimmed.
    pub fn resolve(flag: Option<&str>, data_dir: &Path) -> Result<Self, Error> {
        if let Some(value) = flag.map(str::trim).filter(|v| !v.is_empty()) {
            return Ok(Self {
                value: value.to_owned(),
                origin: "--token/MESH_API_TOKEN".into(),
            });
        }
        let path = data_dir.join(TOKEN_FILE);
        let text = std::fs::read_to_string(&path).map_err(|source| Error::NoToken {
            path: path.clone(),
            source,
        })?;
        let value = text.trim();
        if value.is_empty() {
            return Err(Error::EmptyToken { path });
        }
        Ok(Self {
            value: value.to_owned(),
            origin: path.display().to_string(),
        })
    }
}

/// A client of one meshd control API.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    /// Base URL without a trailing slash, e.g. `http://127.0.0.1:5080`.
    base: String,
    data_dir: PathBuf,
    token_origin: String,
}

impl Client {
    /// Checks the URL and token; opens no connection yet.
    pub fn new(api: &str, data_dir: &Path, token: Token) -> Result<Self, Error> {
        let base = parse_api_url(api)?;
        let mut auth = HeaderValue::try_from(format!("Bearer {}", token.value)).map_err(|_| {
            Error::MalformedToken {
                origin: token.origin.clone(),
            }
        })?;
        auth.set_sensitive(true);
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, auth);
        let http = reqwest::Client::builder()
            .default_headers(headers)
            .user_agent(concat!("meshctl/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(CONNECT_TIMEOUT)
            // The control API is a node's local endpoint; an HTTP_PROXY meant for the internet
            // would only get in the way (and see the token).
            .no_proxy()
            .build()
            .map_err(|e| Error::Transport {
                api: base.clone(),
                cause: describe_chain(&e),
            })?;
        Ok(Self {
            http,
            base,
            data_dir: data_dir.to_owned(),
            token_origin: token.origin,
        })
    }

    /// `POST /v1/objects` with `body` streamed as the object's bytes.
    pub async fn put(&self, query: &PutQuery, body: reqwest::Body) -> Result<PutResponse, Error> {
        let request = self
            .http
            .post(self.url("/v1/objects"))
            .query(query)
            .body(body);
        let response = self.send(request, None).await?;
        self.json(response).await
    }

    /// `GET /v1/objects/{id}/manifest`, checked against the id it was asked for.
    pub async fn manifest(&self, id: &ObjectId) -> Result<Manifest, Error> {
        let request = self
            .http
            .get(self.url(&format!("/v1/objects/{id}/manifest")));
        let response = self.send(request, Some(*id)).await?;
        if response
            .content_length()
            .is_some_and(|len| len > MAX_MANIFEST_LEN as u64)
        {
            return Err(Error::BadResponse(format!(
                "the manifest of {id} is larger than the {MAX_MANIFEST_LEN} bytes a manifest may be"
            )));
        }
        let mut bytes = Vec::new();
        let mut stream = response.bytes_stream();
        while let Some(frame) = stream.next().await {
            let frame = frame.map_err(|e| self.transport_error(e))?;
            if bytes.len() + frame.len() > MAX_MANIFEST_LEN {
                return Err(Error::BadResponse(format!(
                    "the manifest of {id} is larger than the {MAX_MANIFEST_LEN} bytes a manifest \
                     may be"
                )));
            }
            bytes.extend_from_slice(&frame);
        }
        Manifest::decode_verified(id, &bytes)
            .map_err(|source| Error::BadManifest { id: *id, source })
    }

    /// `GET /v1/objects/{id}`: the object's bytes, for the caller to stream and verify.
    pub async fn download(&self, id: &ObjectId) -> Result<Response, Error> {
        let request = self.http.get(self.url(&format!("/v1/objects/{id}")));
        let response = self.send(request, Some(*id)).await?;
        if response.status() != StatusCode::OK {
            return Err(Error::BadResponse(format!(
                "asked for all of {id} and got status {}",
                response.status()
            )));
        }
        Ok(response)
    }

    /// One page of `GET /v1/objects`.
    pub async fn list(&self, after: Option<ObjectId>) -> Result<ListResponse, Error> {
        let query = ListQuery { after, limit: None };
        let request = self.http.get(self.url("/v1/objects")).query(&query);
        let response = self.send(request, None).await?;
        self.json(response).await
    }

    /// `GET /v1/objects/{id}/stat`.
    pub async fn stat(&self, id: &ObjectId) -> Result<StatResponse, Error> {
        let request = self.http.get(self.url(&format!("/v1/objects/{id}/stat")));
        let response = self.send(request, Some(*id)).await?;
        self.json(response).await
    }

    /// `DELETE /v1/objects/{id}`.
    pub async fn delete(&self, id: &ObjectId) -> Result<DeleteResponse, Error> {
        let request = self.http.delete(self.url(&format!("/v1/objects/{id}")));
        let response = self.send(request, Some(*id)).await?;
        self.json(response).await
    }

    /// `GET /v1/status`.
    pub async fn status(&self) -> Result<StatusResponse, Error> {
        let request = self.http.get(self.url("/v1/status"));
        let response = self.send(request, None).await?;
        self.json(response).await
    }

    /// `GET /v1/repair`.
    pub async fn repair(&self) -> Result<mesh_proto::api::RepairStatus, Error> {
        let request = self.http.get(self.url("/v1/repair"));
        let response = self.send(request, None).await?;
        self.json(response).await
    }

    /// `GET /v1/scrub`.
    pub async fn scrub_status(&self) -> Result<ScrubStatus, Error> {
        let request = self.http.get(self.url("/v1/scrub"));
        let response = self.send(request, None).await?;
        self.json(response).await
    }

    /// `POST /v1/scrub`: starts a pass.
    pub async fn scrub_start(&self) -> Result<ScrubStartResponse, Error> {
        let request = self.http.post(self.url("/v1/scrub"));
        let response = self.send(request, None).await?;
        self.json(response).await
    }

    /// `GET /v1/peers`.
    pub async fn peers(&self) -> Result<PeersResponse, Error> {
        let request = self.http.get(self.url("/v1/peers"));
        let response = self.send(request, None).await?;
        self.json(response).await
    }

    /// `POST /v1/jobs`: the node checks the spec and coordinates the job.
    pub async fn submit_job(&self, submit: &JobSubmit) -> Result<SubmitResponse, Error> {
        let request = self.http.post(self.url("/v1/jobs")).json(submit);
        let response = self.send(request, None).await?;
        self.json(response).await
    }

    /// `GET /v1/jobs`.
    pub async fn jobs(&self) -> Result<JobList, Error> {
        let request = self.http.get(self.url("/v1/jobs"));
        let response = self.send(request, None).await?;
        self.json(response).await
    }

    /// `GET /v1/jobs/{id}`.
    pub async fn job(&self, id: &JobId) -> Result<JobStatus, Error> {
        let request = self.http.get(self.url(&format!("/v1/jobs/{id}")));
        let response = self.send(request, None).await?;
        self.json(response).await
    }

    /// `POST /v1/jobs/{id}/cancel`: the job's state after the cancel (a job that had already
    /// ended keeps its state).
    pub async fn cancel_job(&self, id: &JobId) -> Result<JobStatus, Error> {
        let request = self.http.post(self.url(&format!("/v1/jobs/{id}/cancel")));
        let response = self.send(request, None).await?;
        self.json(response).await
    }

    /// `DELETE /v1/jobs/{id}`: forgets an ended job (answered with 204, no body).
    pub async fn forget_job(&self, id: &JobId) -> Result<(), Error> {
        let request = self.http.delete(self.url(&format!("/v1/jobs/{id}")));
        self.send(request, None).await?;
        Ok(())
    }

    /// Maps a failure to send a request or to read a response body.
    pub fn transport_error(&self, err: reqwest::Error) -> Error {
        if err.is_connect() {
            Error::Unreachable {
                api: self.base.clone(),
                data_dir: self.data_dir.clone(),
                cause: root_cause(&err),
            }
        } else {
            Error::Transport {
                api: self.base.clone(),
                cause: describe_chain(&err),
            }
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Sends `request`; a non-success status becomes an [`Error`]. `object` is the object the
    /// route is about, so that a 404 can name it.
    async fn send(
        &self,
        request: RequestBuilder,
        object: Option<ObjectId>,
    ) -> Result<Response, Error> {
        let response = request.send().await.map_err(|e| self.transport_error(e))?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let body = read_prefix(response, MAX_ERROR_BODY).await;
        let (code, message) = match serde_json::from_slice::<ErrorBody>(&body) {
            Ok(ErrorBody { code, message }) => (Some(code), message),
            Err(_) => (None, fallback_message(status, &body)),
        };
        Err(match (status, code) {
            (_, Some(ErrorCode::Unauthorized)) | (StatusCode::UNAUTHORIZED, None) => {
                Error::Unauthorized {
                    message,
                    origin: self.token_origin.clone(),
                }
            }
            (_, Some(ErrorCode::NotFound)) | (StatusCode::NOT_FOUND, None) => match object {
                Some(id) => Error::ObjectNotFound { id },
                None => Error::NotFound { message },
            },
            (_, Some(ErrorCode::DiskFull)) | (StatusCode::INSUFFICIENT_STORAGE, None) => {
                Error::ServerDiskFull { message }
            }
            (_, Some(ErrorCode::Unavailable)) | (StatusCode::SERVICE_UNAVAILABLE, None) => {
                Error::ServerUnavailable { message }
            }
            _ => Error::Server { status, message },
        })
    }

    async fn json<T: DeserializeOwned>(&self, response: Response) -> Result<T, Error> {
        let bytes = response
            .bytes()
            .await
            .map_err(|e| self.transport_error(e))?;
        serde_json::from_slice(&bytes).map_err(|e| {
            Error::BadResponse(format!(
                "{e} (is {} a meshd of this version, {}?)",
                self.base,
                mesh_proto::MESH_VERSION
            ))
        })
    }
}

/// Accepts `http://host:port[/prefix]`, or `host:port` as shorthand; returns it without a
/// trailing slash.
fn parse_api_url(api: &str) -> Result<String, Error> {
    let bad = |reason: &str| Error::BadApiUrl {
        url: api.to_owned(),
        reason: reason.to_owned(),
    };
    let text = api.trim();
    let with_scheme = if text.contains("://") {
        text.to_owned()
    } else {
        format!("http://{text}")
    };
    let url = Url::parse(&with_scheme).map_err(|e| bad(&e.to_string()))?;
    if url.scheme() != "http" {
        return Err(bad(
            "meshctl speaks plain http:// to the node's local control API",
        ));
    }
    if url.host().is_none() {
        return Err(bad("expected http://HOST:PORT"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(bad("expected http://HOST:PORT without a query or fragment"));
    }
    Ok(url.as_str().trim_end_matches('/').to_owned())
}

/// Reads at most `limit` bytes of a body; a body that fails half way yields what arrived.
async fn read_prefix(response: Response, limit: usize) -> Vec<u8> {
    let declared = response
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(0);
    let mut out = Vec::with_capacity(declared.min(limit));
    let mut stream = response.bytes_stream();
    while let Some(Ok(frame)) = stream.next().await {
        let room = limit - out.len();
        out.extend_from_slice(&frame[..frame.len().min(room)]);
        if out.len() == limit {
            break;
        }
    }
    out
}

/// A message for an error response without an [`ErrorBody`] (a proxy, an older node).
fn fallback_message(status: StatusCode, body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        status.canonical_reason().unwrap_or("no details").to_owned()
    } else {
        text.chars().take(500).collect()
    }
}

/// The innermost cause's text ("Connection refused"), which is what a person needs when a
/// connection fails.
fn root_cause(err: &(dyn std::error::Error + 'static)) -> String {
    let mut last = err;
    while let Some(next) = last.source() {
        last = next;
    }
    match last.downcast_ref::<std::io::Error>() {
        Some(io) => io.kind().to_string(),
        None => last.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_urls_are_normalised() {
        assert_eq!(
            parse_api_url("http://127.0.0.1:5080").unwrap(),
            "http://127.0.0.1:5080"
        );
        assert_eq!(
            parse_api_url("http://127.0.0.1:5080/").unwrap(),
            "http://127.0.0.1:5080"
        );
        assert_eq!(
            parse_api_url("127.0.0.1:5080").unwrap(),
            "http://127.0.0.1:5080"
        );
        assert_eq!(parse_api_url("localhost:9").unwrap(), "http://localhost:9");
        assert_eq!(
            parse_api_url("http://h:1/mesh/").unwrap(),
            "http://h:1/mesh"
        );
        let err = parse_api_url("https://h:1").unwrap_err().to_string();
        assert!(err.contains("plain http://"), "{err}");
        assert!(parse_api_url("http://").is_err());
        assert!(parse_api_url("http://h:1/?x=1").is_err());
    }

    #[test]
    fn a_token_flag_wins_over_the_token_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(TOKEN_FILE), "  from-file\n").unwrap();
        let token = Token::resolve(Some(" flag "), dir.path()).unwrap();
        assert_eq!(token.value, "flag");
        let token = Token::resolve(None, dir.path()).unwrap();
        assert_eq!(token.value, "from-file");
        assert!(token.origin.ends_with("api.token"));
        let token = Token::resolve(Some("  "), dir.path()).unwrap();
        assert_eq!(token.value, "from-file");
    }

    #[test]
    fn a_missing_or_empty_token_file_says_what_to_pass() {
        let dir = tempfile::tempdir().unwrap();
        let err = Token::resolve(None, dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("--token") && err.contains("MESH_API_TOKEN"),
            "{err}"
        );
        assert!(
            err.contains("--data-dir") && err.contains("api.token"),
            "{err}"
        );
        std::fs::write(dir.path().join(TOKEN_FILE), "\n").unwrap();
        let err = Token::resolve(None, dir.path()).unwrap_err();
        assert!(matches!(err, Error::EmptyToken { .. }), "{err}");
    }

    #[test]
    fn error_bodies_without_json_still_say_something() {
        assert_eq!(
            fallback_message(StatusCode::BAD_GATEWAY, b""),
            "Bad Gateway"
        );
        assert_eq!(
            fallback_message(StatusCode::BAD_GATEWAY, b" upstream down \n"),
            "upstream down"
        );
    }
}
