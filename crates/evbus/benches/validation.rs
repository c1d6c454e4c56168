//! Validation cost on a ~1 KiB order payload (`afterOrderCreate` of the example catalogue).
//!
//! ```text
//! cargo bench -p evbus --bench validation
//! cargo bench -p evbus --bench validation -- --warm-up-time 1 --measurement-time 3   # quick
//! ```

// criterion's macros generate undocumented items.
#![allow(missing_docs)]

use std::hint::black_box;
use std::path::PathBuf;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use evbus::schema::Catalog;
use serde_json::{Value, json};

fn examples() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/schemas")
}

fn valid_payload() -> Value {
    json!({
        "createdBy": "user-42",
        "order": {
            "_id": "ord_01J9Z6K3M4N5P6Q7",
            "referenceId": "R-100234",
            "shopId": "shop-1",
            "accountId": "acc-7f3a",
            "email": "ada.lovelace@example.com",
            "status": "new",
            "currencyCode": "EUR",
            "items": [
                {"productId": "prod-1", "variantId": "var-1", "sku": "TSHIRT-M-BLUE", "title": "Organic cotton T-shirt", "quantity": 2, "price": 19.9},
                {"productId": "prod-2", "variantId": "var-7", "sku": "SOCKS-42", "title": "Wool socks", "quantity": 3, "price": 7.5},
                {"productId": "prod-3", "variantId": "var-9", "sku": "CAP-ONE", "title": "Baseball cap", "quantity": 1, "price": 14.0}
            ],
            "shippingAddress": {"fullName": "Ada Lovelace", "address1": "12 St James's Square", "address2": "Flat 3", "city": "London", "region": "Greater London", "postal": "SW1Y 4JH", "country": "GB", "phone": "+44 20 7946 0000"},
            "totals": {"subtotal": 76.3, "shipping": 4.9, "tax": 16.24, "discount": 5.0, "total": 92.44},
            "createdAt": "2026-11-27T10:15:00Z",
            "updatedAt": "2026-11-27T10:15:02Z"
        }
    })
}

/// The same payload with three violations: a bad email, a negative price, a missing total.
fn invalid_payload() -> Value {
    let mut p = valid_payload();
    p["order"]["email"] = json!("ada.lovelace.example.com");
    p["order"]["items"][1]["price"] = json!(-7.5);
    p["order"]["totals"]
        .as_object_mut()
        .unwrap()
        .remove("total");
    p
}

fn bench(c: &mut Criterion) {
    let catalog = Catalog::from_dir(examples()).expect("example catalogue");
    let valid = valid_payload();
    let invalid = invalid_payload();
    let size = serde_json::to_vec(&valid).unwrap().len();
    assert!(catalog.validate("afterOrderCreate", &valid).is_ok());
    assert_eq!(
        catalog
            .validate("afterOrderCreate", &invalid)
            .unwrap_err()
            .len(),
        3
    );

    let mut g = c.benchmark_group(format!("validate afterOrderCreate ({size} B)"));
    g.throughput(Throughput::Bytes(size as u64));
    g.bench_function("valid", |b| {
        b.iter(|| {
            catalog
                .validate(black_box("afterOrderCreate"), black_box(&valid))
                .is_ok()
        })
    });
    g.bench_function("invalid (3 violations collected)", |b| {
        b.iter(|| {
            catalog
                .validate(black_box("afterOrderCreate"), black_box(&invalid))
                .unwrap_err()
                .len()
        })
    });
    g.finish();

    c.bench_function("load and freeze the example catalogue", |b| {
        b.iter(|| Catalog::from_dir(black_box(examples())).unwrap())
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
