//! RFC 7662 token introspection for opaque tokens (and for JWTs on routes that ask for it).

use std::sync::Arc;
use std::time::Instant;

use base64::Engine;
use serde_json::{Map, Value};

use super::{Checked, Method, Principal, TokenError, Unavailable, now_secs};
use crate::config::{ClientAuth, IntrospectionSettings, IssuerConfig, RegionRules};
use crate::metrics::Metrics;

pub struct Introspector {
    name: Arc<str>,
    issuer: String,
    audiences: Vec<String>,
    uri: String,
    client_id: String,
    client_secret: String,
    auth: ClientAuth,
    leeway: u64,
    regions: RegionRules,
    http: reqwest::Client,
    metrics: Metrics,
}

impl Introspector {
    pub fn new(
        ic: &IssuerConfig,
        s: &IntrospectionSettings,
        name: Arc<str>,
        regions: RegionRules,
        http: reqwest::Client,
        metrics: Metrics,
    ) -> Introspector {
        Introspector {
            name,
            issuer: ic.issuer.clone(),
            audiences: ic.audiences.clone(),
            uri: s.uri.clone().unwrap_or_default(),
            client_id: s.client_id.clone(),
            client_secret: s.client_secret.clone(),
            auth: s.client_auth,
            leeway: ic.leeway,
            regions,
            http,
            metrics,
        }
    }

    pub async fn introspect(&self, token: &str) -> Checked {
        let start = Instant::now();
        let result = self.call(token).await;
        self.metrics
            .token_service_duration
            .with_label_values(&[&self.name, "introspection"])
            .observe(start.elapsed().as_secs_f64());
        let body = result.map_err(|e| {
            tracing::warn!(issuer = %self.name, error = %e, "introspection failed");
            Unavailable
        })?;
        Ok(self.judge(&body).map(Arc::new))
    }

    async fn call(&self, token: &str) -> Result<Map<String, Value>, String> {
        let mut form = vec![("token", token), ("token_type_hint", "access_token")];
        let mut req = self.http.post(&self.uri).header(http::header::ACCEPT, "application/json");
        match self.auth {
            ClientAuth::Basic => {
                // RFC 6749 §2.3.1: the id and secret are form-urlencoded before being joined.
                let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
                let pair = format!("{}:{}", enc(&self.client_id), enc(&self.client_secret));
                let value = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(pair));
                req = req.header(http::header::AUTHORIZATION, value);
            }
            ClientAuth::Post => {
                form.push(("client_id", &self.client_id));
                form.push(("client_secret", &self.client_secret));
            }
        }
        let body: String = form_urlencoded::Serializer::new(String::new()).extend_pairs(form).finish();
        let resp = req
            .header(http::header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(body)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            return Err(format!("HTTP {}", resp.status()));
        }
        let bytes = resp.bytes().await.map_err(|e| e.to_string())?;
        match serde_json::from_slice::<Value>(&bytes) {
            Ok(Value::Object(m)) => Ok(m),
            _ => Err("the response is not a JSON object".into()),
        }
    }

    /// RFC 7662 §2.2: only a JSON `true` in `active` is active; the rest is checked like a JWT's claims.
    fn judge(&self, claims: &Map<String, Value>) -> Result<Principal, TokenError> {
        if claims.get("active") != Some(&Value::Bool(true)) {
            return Err(TokenError::Inactive);
        }
        let now = now_secs();
        match claims.get("exp") {
            Some(Value::Number(n)) if n.as_u64().is_some_and(|e| e + self.leeway <= now) => {
                return Err(TokenError::Expired);
            }
            Some(Value::Number(n)) if n.as_u64().is_some() => {}
            None => {}
            Some(_) => return Err(TokenError::Malformed),
        }
        if claims.get("nbf").and_then(Value::as_u64).is_some_and(|n| n > now + self.leeway) {
            return Err(TokenError::NotYetValid);
        }
        if let Some(iss) = claims.get("iss")
            && iss.as_str() != Some(self.issuer.as_str())
        {
            return Err(TokenError::UnknownIssuer);
        }
        if !self.audiences.is_empty() {
            let ok = match claims.get("aud") {
                None => true,
                Some(Value::String(a)) => self.audiences.contains(a),
                Some(Value::Array(list)) => {
                    list.iter().filter_map(Value::as_str).any(|a| self.audiences.iter().any(|x| x == a))
                }
                Some(_) => false,
            };
            if !ok {
                return Err(TokenError::WrongAudience);
            }
        }
        Ok(Principal::from_claims(&self.name, Method::Introspection, claims, &self.regions))
    }
}
