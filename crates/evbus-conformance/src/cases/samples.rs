//! Events whose envelope must survive any transport byte for byte.

use evbus::{Event, Transport};

use crate::support::Ctx;

/// Every attribute and extension set, with unicode values and JSON data in a `+json` type
/// written with unusual spacing (a transport must not re-encode it).
pub(super) fn full_event() -> Event {
    Event::builder(
        "com.example.shop.afterOrderCreate.v2",
        "https://shop.example.com/orders?region=eu#x",
    )
    .id(format!("order-42/ü:{}", uuid_like("full")))
    .time_str("2024-02-29T23:59:59.123456789Z")
    .subject("orders/42/Łódź 日本 & more")
    .dataschema("https://schemas.example.com/events/afterOrderCreate/2.json#/$defs/Order")
    .partition_key("customer-42/ü")
    .traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    .extension("tracestate", "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE")
    .extension("tenant", "acme")
    .extension("region", "eu-west-1 ✓")
    .extension("retries2", "0")
    .data(
        "application/vnd.example.order+json; charset=utf-8",
        &br#"{"orderId":"o-42",  "total": 42.50, "items":[ ],"note":"caf\u00e9"}"#[..],
    )
    .build()
    .expect("the full sample event is valid")
}

/// Unicode JSON data with escapes and unusual formatting (`application/json`).
pub(super) fn unicode_json_event<T: Transport + 'static>(ctx: &Ctx<T>) -> Event {
    let json = "{ \"name\" : \"Zoë ☕ 日本語 🎉 Ω\",\n\t\"escaped\":\"\\u00e9\\n\\\"q\\\"\",\
                \"numbers\":[1, 2.50e3 ,-0.0],\"nothing\":null }";
    Event::builder("evbus.conformance.unicode", ctx.source())
        .data("application/json", json.as_bytes().to_vec())
        .build()
        .expect("the unicode sample event is valid")
}

/// Unicode text data (`text/plain`), with line breaks and a NUL.
pub(super) fn unicode_text_event<T: Transport + 'static>(ctx: &Ctx<T>) -> Event {
    let text = "première ligne\r\nвторая строка\n第三行\t🎉\0end";
    Event::builder("evbus.conformance.text", ctx.source())
        .data("text/plain; charset=utf-8", text.as_bytes().to_vec())
        .build()
        .expect("the text sample event is valid")
}

/// Every byte value, invalid UTF-8 and a JSON-looking prefix, as `application/octet-stream`.
pub(super) fn binary_event<T: Transport + 'static>(ctx: &Ctx<T>) -> Event {
    let mut data: Vec<u8> = b"{\"not\":\"json\"".to_vec();
    data.extend(0..=255u8);
    data.extend([
        0xff, 0xfe, 0x00, 0xc3, 0x28, 0xa0, 0xa1, 0xe2, 0x28, 0xa1, 0x00, 0x00,
    ]);
    data.extend((0..=255u8).rev());
    Event::builder("evbus.conformance.binary", ctx.source())
        .data("application/octet-stream", data)
        .build()
        .expect("the binary sample event is valid")
}

/// A second binary type, to show the content type travels as given.
pub(super) fn png_event<T: Transport + 'static>(ctx: &Ctx<T>) -> Event {
    let mut data = b"\x89PNG\r\n\x1a\n".to_vec();
    data.extend((0..512u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8));
    Event::builder("evbus.conformance.image", ctx.source())
        .data("image/png", data)
        .build()
        .expect("the png sample event is valid")
}

/// No data, no content type, no time, no optional attribute at all.
pub(super) fn bare_event<T: Transport + 'static>(ctx: &Ctx<T>) -> Event {
    Event::builder("evbus.conformance.bare", ctx.source())
        .time(None)
        .build()
        .expect("the bare sample event is valid")
}

/// JSON data without a `datacontenttype` (JSON is the default): it must stay absent.
pub(super) fn untyped_json_event<T: Transport + 'static>(ctx: &Ctx<T>) -> Event {
    Event::builder("evbus.conformance.untyped", ctx.source())
        .data_bytes(Some(b"[1,\"two\",{\"3\":4}]".to_vec().into()))
        .build()
        .expect("the untyped sample event is valid")
}

/// Every sample above.
pub(super) fn all<T: Transport + 'static>(ctx: &Ctx<T>) -> Vec<Event> {
    vec![
        full_event(),
        unicode_json_event(ctx),
        unicode_text_event(ctx),
        binary_event(ctx),
        png_event(ctx),
        bare_event(ctx),
        untyped_json_event(ctx),
    ]
}

/// A distinct suffix for ids set by hand, so two runs never share an id.
fn uuid_like(label: &str) -> String {
    let generated = Event::builder("x", "/x")
        .build()
        .expect("a minimal event is valid");
    format!("{label}-{}", generated.id())
}
