// Arbiter's admin API reference: asks for the bearer token, then loads the (authenticated) OpenAPI
// document with it. The token stays in this closure: not in storage, not in the URL.
(function () {
  "use strict";
  var form = document.getElementById("arbiter-login");
  var status = document.getElementById("arbiter-status");
  var spec = new URL("openapi.json", window.location.href).href;

  function withToken(token) {
    return function (req) {
      // Only requests to this server carry the token (Try it out included).
      if (new URL(req.url, window.location.href).origin === window.location.origin) {
        req.headers = req.headers || {};
        req.headers.Authorization = "Bearer " + token;
      }
      return req;
    };
  }

  form.addEventListener("submit", function (event) {
    event.preventDefault();
    var token = document.getElementById("arbiter-token").value.trim();
    status.textContent = "Loading…";
    fetch(spec, { headers: { Authorization: "Bearer " + token }, credentials: "omit" })
      .then(function (resp) {
        if (!resp.ok) {
          return resp.json().then(function (body) {
            var error = (body && body.error) || {};
            throw new Error(resp.status + " " + (error.code || "") + ": " + (error.message || ""));
          });
        }
        return resp.json();
      })
      .then(function (doc) {
        form.hidden = true;
        status.textContent = "";
        window.SwaggerUIBundle({
          spec: doc,
          dom_id: "#swagger-ui",
          deepLinking: true,
          validatorUrl: null, // no call to validator.swagger.io
          requestInterceptor: withToken(token),
        });
      })
      .catch(function (err) {
        status.textContent = "Could not load the API description: " + err.message;
      });
  });
})();
